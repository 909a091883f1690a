"""Shared fixtures for the moeedge tests: seeded expert files, stores and caches.

Every file is written from a seeded numpy generator, so a failing test sees the
same bytes on every run. Experts used for capacity arithmetic are a whole
number of 4096-byte pages, so that ``store.slot_bytes(key) == store.nbytes(key)``
with buffered reads; budgets are always computed from ``slot_bytes``.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from moeedge import ExpertCache, ExpertKey, ExpertStore

PAGE = 4096
EXPERT_BYTES = 4 * PAGE
WAIT_S = 30.0  # upper bound for background work to settle (never a timing assertion)


# --------------------------------------------------------------------------- helpers

def seeded_bytes(seed: int, nbytes: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()


def key(layer: int, expert: int) -> int:
    return ExpertKey(layer, expert).packed


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def write_file(path: Path, nbytes: int, seed: int) -> bytes:
    data = seeded_bytes(seed, nbytes)
    path.write_bytes(data)
    return data


def pack(contents: list[bytes], segments) -> bytes:
    """The bytes an expert must have: its segments, back to back, in order."""
    return b"".join(contents[f][o:o + n] for f, o, n in segments)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll until ``predicate()`` holds; fail (not hang) if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {what}")
        time.sleep(0.002)


def run_bounded(fn, timeout: float = 30.0):
    """Run fn() in a daemon thread; fail instead of hanging if it blocks."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"call still blocked after {timeout:.0f}s (deadlock?)"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def assert_names_key(message: str, k: int) -> None:
    """The message identifies key ``k``: packed decimal, hex, or layer and expert."""
    layer, expert = k >> 32, k & 0xFFFFFFFF
    ok = (str(k) in message or hex(k) in message.lower()
          or (str(layer) in message and str(expert) in message))
    assert ok, f"message does not name key {k} (layer {layer}, expert {expert}): {message!r}"


@dataclass
class Experts:
    """Files on disk, the ranges over them, the expected bytes and the open store."""

    paths: list[str]
    ranges: dict[int, list[tuple[int, int, int]]]
    contents: list[bytes]
    store: ExpertStore
    keys: list[int] = field(default_factory=list)

    def expected(self, k: int) -> bytes:
        return pack(self.contents, self.ranges[k])

    @property
    def slot(self) -> int:
        """The largest slot of any expert (all equal for the uniform layouts)."""
        return max(self.store.slot_bytes(k) for k in self.keys)


def open_store(paths, ranges, direct_io: bool = False) -> ExpertStore:
    store = ExpertStore([str(p) for p in paths], ranges, direct_io=direct_io)
    if direct_io:
        # Only used on directories that were probed to accept O_DIRECT reads.
        assert store.direct_io, f"store fell back from O_DIRECT: {store.direct_io_fallback!r}"
        assert store.direct_io_fallback == ""
    return store


# --------------------------------------------------------------------------- O_DIRECT

def _fs_type(path: Path) -> str:
    best, fstype = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def supports_o_direct(directory: Path) -> bool:
    """True when a file in ``directory`` can be opened and read with O_DIRECT
    (tmpfs is excluded: the store is allowed to fall back there)."""
    if not hasattr(os, "O_DIRECT") or _fs_type(directory) == "tmpfs":
        return False
    probe = Path(directory) / ".odirect-probe"
    try:
        probe.write_bytes(b"\x5a" * 2 * PAGE)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, PAGE)  # page aligned
            return os.preadv(fd, [buf], PAGE) == PAGE and buf[:4] == b"\x5a" * 4
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@pytest.fixture
def odirect_dir(tmp_path):
    """A directory whose file system accepts O_DIRECT: tmp_path, else one under
    /var/tmp or /work. Skips when there is none."""
    if supports_o_direct(tmp_path):
        yield tmp_path
        return
    for base in ("/var/tmp", "/work"):
        if not os.path.isdir(base) or not os.access(base, os.W_OK):
            continue
        d = Path(tempfile.mkdtemp(prefix="moeedge-odirect-", dir=base))
        if supports_o_direct(d):
            try:
                yield d
            finally:
                shutil.rmtree(d, ignore_errors=True)
            return
        shutil.rmtree(d, ignore_errors=True)
    pytest.skip("no writable directory (tmp_path, /var/tmp, /work) supports O_DIRECT reads")


@dataclass
class IOMode:
    name: str
    direct_io: bool
    directory: Path


@pytest.fixture(params=["buffered", "direct"])
def io_mode(request, tmp_path) -> IOMode:
    """Both read paths: buffered in tmp_path, O_DIRECT in a directory that supports it."""
    if request.param == "buffered":
        return IOMode("buffered", False, tmp_path)
    return IOMode("direct", True, request.getfixturevalue("odirect_dir"))


# --------------------------------------------------------------------------- experts

@pytest.fixture
def make_experts(tmp_path):
    """Factory: ``n`` experts of ``nbytes`` each, back to back in one seeded file.

    Keys are ``ExpertKey(1 + i // 8, i % 8)``: every key is above 2**32, so a core
    that truncates keys to 32 bits cannot pass. Optional ``gap`` bytes between
    experts and a ``lead`` offset before the first one make unaligned layouts.
    """
    counter = iter(range(1_000_000))

    def make(n: int = 5, nbytes: int = EXPERT_BYTES, *, direct_io: bool = False,
             directory: Path | None = None, seed: int = 1234, lead: int = 0,
             gap: int = 0) -> Experts:
        directory = Path(directory or tmp_path)
        path = directory / f"experts-{next(counter)}.bin"
        size = lead + n * nbytes + (n - 1) * gap + 7  # 7 trailing bytes: size not page aligned
        content = write_file(path, size, seed)
        keys = [key(1 + i // 8, i % 8) for i in range(n)]
        ranges = {k: [(0, lead + i * (nbytes + gap), nbytes)] for i, k in enumerate(keys)}
        store = open_store([path], ranges, direct_io)
        return Experts([str(path)], ranges, [content], store, keys)

    return make


@pytest.fixture
def make_cache():
    """Factory for ExpertCache objects that are closed when the test ends."""
    caches: list[ExpertCache] = []

    def make(store: ExpertStore, budget_bytes: int, policy: str = "lru",
             io_threads: int = 2) -> ExpertCache:
        cache = ExpertCache(store, budget_bytes, policy=policy, io_threads=io_threads)
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        with contextlib.suppress(RuntimeError):
            cache.close()


# --------------------------------------------------------------------------- kernel paths

@contextlib.contextmanager
def kernel_path(name: str):
    """The native kernels take path `name` ("scalar", "avx2", "avx512") inside the block."""
    from moeedge import _core

    _core.linear_force_path(name)
    try:
        yield name
    finally:
        _core.linear_force_path("")


@pytest.fixture(params=None)
def path(request):
    """Each kernel path this CPU can take (the tests that use it run once per path)."""
    with kernel_path(request.param) as name:
        yield name


def pytest_generate_tests(metafunc):
    if "path" in metafunc.fixturenames:
        from moeedge import _core

        metafunc.parametrize("path", _core.linear_paths(), indirect=True)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Mixtral with a tokenizer and a chat template (what `moeedge chat` needs)."""
    from tiny_checkpoints import make_decoder, write_tokenizer

    directory = tmp_path_factory.mktemp("chat")
    make_decoder(directory, "mixtral", seed=4)
    write_tokenizer(directory)
    return directory


# --------------------------------------------------------------------------- threads

@pytest.fixture
def restore_threads():
    """load(threads=N) sets the process's kernel and torch threads: put them back for the tests after."""
    import torch

    from moeedge import _core

    torch_threads = torch.get_num_threads()
    yield
    _core.set_kernel_threads(0)
    torch.set_num_threads(torch_threads)
