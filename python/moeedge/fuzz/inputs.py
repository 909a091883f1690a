"""One fuzz input: which seed it starts from, the files it changes, what runs on it, and
how it is written to a scratch directory. The classes of input live in hf_inputs,
gguf_inputs and templates; moeedge.fuzz.classes names them and draws any one input."""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from moeedge.fuzz.seeds import Seeds


@dataclass(frozen=True)
class Fifo:
    """A named pipe where a file should be: open() blocks until someone writes."""


@dataclass(frozen=True)
class Directory:
    """A directory where a file should be."""


@dataclass(frozen=True)
class Sparse:
    """A regular file of `size` zero bytes that takes no disk: a huge file read whole."""

    size: int


@dataclass(frozen=True)
class Symlink:
    target: str  # "{outside}" is replaced by the scratch directory beside the checkpoint


class WithOutside(bytes):
    """File bytes holding "{outside}", replaced with the scratch directory beside the
    checkpoint when written: an absolute path to a file outside it."""


Content = bytes | Fifo | Directory | Sparse | Symlink | None  # None: the seed's file deleted


@dataclass
class FuzzInput:
    cls: str
    index: int
    seed: str                  # a name in Seeds.hf or Seeds.gguf
    description: str
    target: str                # "load", "chat", "cli-info" or "cli-run"
    files: dict[str, Content] = field(default_factory=dict)    # over the seed's files (GGUF: "model.gguf")
    outside: dict[str, bytes] = field(default_factory=dict)    # files beside the checkpoint, for ../ paths

    @property
    def name(self) -> str:
        return f"{self.cls}-{self.index}"


def _write(path: Path, content: Content, outside: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if content is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, WithOutside):
        path.write_bytes(content.replace(b"{outside}", str(outside).encode()))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, Fifo):
        os.mkfifo(path)
    elif isinstance(content, Directory):
        path.mkdir()
    elif isinstance(content, Sparse):
        with open(path, "wb") as f:
            f.truncate(content.size)
    else:
        os.symlink(content.target.replace("{outside}", str(outside)), path)


def materialize(inp: FuzzInput, seeds: Seeds, dest: Path) -> Path:
    """Write the input under dest; returns what the target opens (a directory or a .gguf)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in inp.outside.items():
        (dest / name).write_bytes(data)
    if inp.seed in seeds.gguf:
        path = dest / "model.gguf"
        content = inp.files.get("model.gguf", seeds.gguf_path(inp.seed).read_bytes())
        _write(path, content, dest)
        return path
    path = dest / "ckpt"
    shutil.copytree(seeds.hf[inp.seed], path)
    for name, content in inp.files.items():
        _write(path / name, content, dest)
    return path


def pick_target(rng: random.Random, main: str) -> str:
    """Mostly the class's own target; one input in five through the CLI."""
    roll = rng.random()
    if roll < 0.1:
        return "cli-info"
    if roll < 0.2:
        return "cli-run"
    return main
