"""A Hugging Face hub cache written by hand, laid out exactly as huggingface_hub lays it
out: models--ORG--NAME/blobs/<sha256>, refs/<revision> holding a commit hash, and
snapshots/<commit>/<file> as relative symlinks into ../../blobs (deeper files: more ..)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main",
               commit: str | None = None) -> Path:
    """Add one revision's snapshot; returns the snapshot folder."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # huggingface_hub writes it without a newline
    return snapshot
