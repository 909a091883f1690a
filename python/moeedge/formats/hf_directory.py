"""A Hugging Face checkpoint directory's files: config.json, the .safetensors shards
(listed by model.safetensors.index.json, or found beside it), tokenizer files and
moeedge's own descriptions. Every file is named through HFDirectory, which confines it
to the directory's trust root (moeedge.formats.trust)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from moeedge.formats.errors import CheckpointError, brief, shown, shown_list, shown_name
from moeedge.formats.trust import open_regular, require_regular, resolve_inside, trust_root

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# chat_template.jinja: where transformers 4.50+ saves the chat template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# Trained expert predictors kept beside the weights (moeedge.predict.bundle): not a shard.
PREDICTOR_FILE = "moeedge_predictor.safetensors"
# Files others read from the directory by these names (moeedge.runtime.prefetcher the
# predictors, moeedge.derived copies them): checked when the checkpoint is opened.
SIDE_FILES = (PREDICTOR_FILE, "generation_config.json")
# JSON descriptions (config, index, moeedge's own) are kilobytes; a real index of a
# 100k-tensor model a few MiB. A larger one is refused before it is read.
MAX_JSON_BYTES = 64 << 20


def _check_printable(names: list[str], named_by) -> None:
    """Shard names end up in error messages as paths: one with a newline or another control
    character would break a message over lines, so it is refused here."""
    bad = [n for n in names if not n.isprintable()]
    if bad:
        raise CheckpointError(f"{named_by}: shard name {shown_name(bad[0])} holds control characters")


class HFDirectory:
    """A checkpoint directory; root: the real path its files must lie in."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.root = trust_root(self.path)

    def file(self, name: str, named_by: str | os.PathLike | None = None) -> Path:
        """directory / name: inside the trust root, and a regular file (CheckpointError
        names named_by, the directory by default, and the entry)."""
        path = resolve_inside(self.root, self.path, name, named_by or self.path)
        require_regular(path)
        return path

    def find(self, name: str) -> Path | None:
        """A file the format names by convention, checked; None where there is none."""
        return self.file(name) if os.path.lexists(self.path / name) else None

    def read_json(self, path: Path, what: str):
        """path (from file or find) parsed; CheckpointError says it is not `what` ("valid JSON")."""
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB moeedge "
                                      f"reads of a JSON description")
            data = f.read(MAX_JSON_BYTES)
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not {what} (not UTF-8 at byte {e.start})") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: not {what} ({brief(e)})") from None

    def config(self) -> dict:
        if not os.path.lexists(self.path / CONFIG_FILE):
            raise CheckpointError(f"{self.path}: no config.json (a Hugging Face checkpoint directory has one)")
        path = self.file(CONFIG_FILE)
        raw = self.read_json(path, "valid JSON")
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return raw

    def shard_files(self) -> list[Path]:
        index = self.find(INDEX_FILE)
        if index is not None:
            names = sorted(set(self._weight_map(index).values()))
            _check_printable(names, index)
            paths = [resolve_inside(self.root, self.path, n, index) for n in names]  # before looking at them
            missing = [n for n, p in zip(names, paths) if not os.path.lexists(p)]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {shown_list(missing)}")
            return [self.file(n, index) for n in names]
        files = sorted(self.file(p.name) for p in self.path.glob("*.safetensors") if p.name != PREDICTOR_FILE)
        _check_printable([p.name for p in files], self.path)
        if files:
            return files
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{self.path}: found {shown_list(pickles)}, a pickle checkpoint; moeedge never "
                                  f"unpickles. Supported: .safetensors (Hugging Face) or .gguf")
        raise CheckpointError(f"{self.path}: no .safetensors files")

    def _weight_map(self, index: Path) -> dict[str, str]:
        raw = self.read_json(index, "a valid safetensors index")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must map tensor names to "
                                  f"file names, got {shown(weight_map)})")
        return weight_map

    def check_side_files(self) -> None:
        for name in SIDE_FILES:
            self.find(name)

    def tokenizer_files(self, aliases: dict[str, str] | None = None) -> dict[str, str]:
        """Tokenizer file name -> path, of those present. aliases: name -> another file
        read as it where it is absent (Switch's spiece.model as tokenizer.model)."""
        found = {n: str(p) for n in TOKENIZER_FILES if (p := self.find(n)) is not None}
        for name, alias in (aliases or {}).items():
            if name not in found and (p := self.find(alias)) is not None:
                found[name] = str(p)
        return found
