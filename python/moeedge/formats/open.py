"""One way to open a checkpoint: a Hugging Face directory (a decoder MoE, moeedge's
quantized directory, an aggregated variant, a Switch Transformer), a .gguf file, a
Hugging Face repo id (moeedge.formats.hub: org/name, @revision, :QUANT), or None for
the bundled default model. The formats' modules each read one kind; which
one reads a source is decided here and nowhere else."""
from __future__ import annotations

import os
from pathlib import Path

from moeedge.default_model import default_model_path
from moeedge.formats import hub
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.decoder_checkpoint import open_decoder
from moeedge.formats.errors import CheckpointError, shown
from moeedge.formats.generation_config import GENERATION_CONFIG, hf_sampling
from moeedge.formats.gguf_checkpoint import open_gguf
from moeedge.formats.hf_config import DECODER_FAMILIES
from moeedge.formats.hf_directory import HFDirectory
from moeedge.formats.quant_checkpoint import QUANT_FILE, open_quant_directory
from moeedge.formats.switch_checkpoint import open_switch

SWITCH = "switch_transformers"
SUPPORTED = DECODER_FAMILIES + (SWITCH,)


def resolve_source(source: str | os.PathLike | None) -> Path:
    """The local path a source names: itself where it exists (a path always wins over a
    repo id), else the Hugging Face repo it names, from the cache or downloaded."""
    if source is None:
        return Path(default_model_path())
    path = Path(source)
    if path.exists() or os.path.islink(path):
        return path
    return hub.resolve(os.fspath(source), precheck=_check_model_type)


def open_checkpoint(source: str | os.PathLike | None) -> Checkpoint:
    """A Hugging Face directory, a .gguf file or a repo id; CheckpointError says what was found otherwise."""
    path = resolve_source(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (a broken symlink)")
    if path.is_dir():
        return open_hf_directory(path)
    if path.suffix == ".gguf":
        return open_gguf(path)
    raise CheckpointError(f"{path}: not a checkpoint moeedge reads (a Hugging Face directory with .safetensors, "
                          f"or a .gguf file)")


def _check_model_type(path: str | os.PathLike) -> tuple[HFDirectory, dict, str]:
    """The directory, its config and its model_type, which moeedge must run."""
    directory = HFDirectory(path)
    raw = directory.config()
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        raise CheckpointError(f"{directory.path / 'config.json'}: model_type {shown(model_type)} is not supported; "
                              f"supported: {', '.join(SUPPORTED)}")
    return directory, raw, model_type


def open_hf_directory(path: str | os.PathLike) -> Checkpoint:
    """A Hugging Face directory, read by the module for its model_type and variant."""
    directory, raw, model_type = _check_model_type(path)
    directory.check_side_files()
    if model_type == SWITCH:
        ckpt = open_switch(directory, raw)
    elif directory.find(QUANT_FILE) is not None:  # written by `moeedge quantize`
        ckpt = open_quant_directory(directory, raw)
    else:
        ckpt = open_decoder(directory, raw)
    if (path := directory.find(GENERATION_CONFIG)) is not None:
        ckpt.sampling = hf_sampling(directory.read_json(path, "valid JSON"), path)
        ckpt.sampling_from = str(path) if ckpt.sampling else None
    return ckpt
