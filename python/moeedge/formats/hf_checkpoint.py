"""The names this module had before moeedge.formats.open took over opening checkpoints,
kept so that code not yet moved to the new modules still imports them (moeedge.api,
moeedge.models.decoder). New code imports from where they live:
moeedge.formats.open (open_hf_directory, open_checkpoint), moeedge.formats.decoder_tensors
(tensor names), moeedge.formats.hf_directory (file names), moeedge.formats.variant_map."""
from __future__ import annotations

from moeedge.formats.decoder_tensors import EXPERT_NAMES, LOWRANK_FACTORS, expert_tensor_names
from moeedge.formats.hf_directory import PICKLE_SUFFIXES, PREDICTOR_FILE, TOKENIZER_FILES
from moeedge.formats.open import open_hf_directory
from moeedge.formats.variant_map import VARIANT_FILE

__all__ = ["EXPERT_NAMES", "LOWRANK_FACTORS", "PICKLE_SUFFIXES", "PREDICTOR_FILE", "TOKENIZER_FILES", "VARIANT_FILE",
           "expert_tensor_names", "open_hf_directory"]
