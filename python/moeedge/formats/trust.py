"""Which files a checkpoint may name. A downloaded checkpoint is untrusted: its index,
a symlink in it or any other entry could name /etc/shadow (whose first bytes an error
message would then show), a FIFO (opening it blocks forever) or /dev/zero (reading it
never ends). So every file a checkpoint names must resolve, by its real path with every
symlink followed, inside the checkpoint's trust root, and be a regular file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from moeedge.formats.errors import CheckpointError, shown, shown_name

KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}


def trust_root(directory: str | os.PathLike) -> Path:
    """The real path a checkpoint directory's files must lie in: the directory itself, or,
    for a Hugging Face hub cache snapshot (.../models--ORG--NAME/snapshots/REV/...), whose
    files are symlinks into .../models--ORG--NAME/blobs/, the repository's cache folder."""
    real = Path(os.path.realpath(directory))
    parts = real.parts
    for i in range(len(parts) - 3, 0, -1):  # the innermost repository folder holding this snapshot
        if parts[i].startswith("models--") and len(parts[i]) > len("models--") and parts[i + 1] == "snapshots":
            return Path(*parts[:i + 1])
    return real


def resolve_inside(root: Path, directory: Path, name: str, named_by: str | os.PathLike) -> Path:
    """directory / name, once its real path is known to lie inside root (the directory's
    trust_root); it need not exist. named_by, the file or directory that names it, and
    the entry itself are what CheckpointError names."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        raise CheckpointError(f"{named_by}: {shown(name)} is not a relative file name inside the checkpoint")
    path = directory / name
    real = os.path.realpath(path)
    if os.path.commonpath([real, str(root)]) != str(root):
        raise CheckpointError(f"{named_by}: {shown(name)} lies outside the checkpoint's folder {root} "
                              f"(its real path, symlinks followed, is {shown_name(real)}); refused")
    return path


def require_regular(path: str | os.PathLike) -> os.stat_result:
    """os.stat(path), which must be a regular file: a FIFO or a device would block or never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    _check_regular(path, st)
    return st


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of path, a regular file. O_NONBLOCK makes opening a FIFO
    return at once (it blocks until a writer comes otherwise), so that the check is made
    on what was opened, not on what the path named a moment before."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    try:
        _check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
        raise CheckpointError(f"{path}: {kind}, not a regular file; a checkpoint's files must be regular files")
