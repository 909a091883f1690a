"""Where a ladder lives and what its manifest says.

A pack is a directory: manifest.json, one safetensors file per (MoE layer, variant) that
the runtime can read, and routing.npz (the calibration text's routing, for the
simulator's hit-rate curve). The source is only read; nothing of it is copied. The
default directory is $XDG_CACHE_HOME/moeedge/ladders/<identity hash>: the identity is
the source's config.json and each weight file's name, size and first 64 KiB (the
safetensors header, with every tensor's offsets), so a copy of the same checkpoint
finds the same pack and a changed one does not.

The manifest is rewritten (atomically) after each layer, so an interrupted build
resumes at the first layer it does not list.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = "moeedge-ladder"
VERSION = 1
MANIFEST = "manifest.json"
ROUTING = "routing.npz"
HEAD_BYTES = 64 << 10


def source_identity(ckpt) -> dict:
    """What identifies the source's weights (module docstring)."""
    files = []
    for path in ckpt.files:
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
        files.append({"name": Path(path).name, "bytes": os.path.getsize(path), "head_sha256": head})
    config = Path(ckpt.source) / "config.json"
    config_hash = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else ""
    return {"config_sha256": config_hash, "files": files}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def default_dir(ckpt) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moeedge" / "ladders" / identity_hash(source_identity(ckpt))


def read_manifest(directory: Path) -> dict | None:
    """The manifest, None where the directory has none; ValueError for one not a ladder's."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a ladder manifest ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} manifest")
    if not isinstance(raw.get("layers"), dict) or not isinstance(raw.get("identity"), dict):
        raise ValueError(f"{path}: a ladder manifest needs 'identity' and 'layers'")
    return raw


def write_manifest(directory: Path, manifest: dict) -> None:
    """Atomically: an interruption leaves the previous manifest."""
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def check_source(manifest: dict, ckpt, directory: Path) -> None:
    """A pack belongs to one source: ValueError for another's."""
    if manifest["identity"] != source_identity(ckpt):
        raise ValueError(f"{directory}: a ladder of another checkpoint than {ckpt.source} (its weights or "
                         f"config differ); give another --output or remove it")


def layer_file(layer: int, variant: str) -> str:
    return f"layer{layer:04d}-{variant}.safetensors"
