"""Open any checkpoint moeedge reads: a Hugging Face directory or a .gguf file."""
from __future__ import annotations

import os
from pathlib import Path

from moeedge.default_model import default_model_path
from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.errors import CheckpointError
from moeedge.formats.gguf_checkpoint import open_gguf
from moeedge.formats.hf_checkpoint import open_hf_directory


def open_checkpoint(source: str | os.PathLike | None) -> Checkpoint:
    """A Hugging Face directory or a .gguf file (None: the bundled default model);
    CheckpointError says what was found otherwise."""
    path = Path(default_model_path() if source is None else source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return open_hf_directory(path)
    if path.suffix == ".gguf":
        return open_gguf(path)
    raise CheckpointError(f"{path}: not a checkpoint moeedge reads (a Hugging Face directory with .safetensors, "
                          f"or a .gguf file)")
