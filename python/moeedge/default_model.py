"""The model `moeedge.load()` and `moeedge chat` use when no checkpoint is named."""
from __future__ import annotations

from pathlib import Path

from moeedge.formats.errors import CheckpointError

BUNDLED = Path(__file__).parent / "models_data" / "default"


def default_model_path() -> Path:
    if (BUNDLED / "config.json").is_file():
        return BUNDLED
    raise CheckpointError("no checkpoint given and this build of moeedge bundles no default model yet: "
                          "name a Hugging Face directory or a .gguf file")
