"""Measured read throughput of this machine's disk and of the expert cache on it.

The ceiling is a dd-style sequential read of the same file with O_DIRECT in 4 MiB
blocks; the cache reads experts laid out as checkpoints lay them (back to back,
not page-aligned). Every measurement starts cold: the file is dropped from the
page cache first.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeedge._core import ExpertCache, ExpertStore
from moeedge.cgroup import evict_files

BLOCK_BYTES = 4 << 20


def write_scratch_file(path: str | Path, nbytes: int, seed: int = 0) -> Path:
    """Random bytes (no all-zero pages a file system could skip), written in 16 MiB chunks."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    chunk = 16 << 20
    with open(path, "wb") as f:
        for start in range(0, nbytes, chunk):
            f.write(rng.integers(0, 256, size=min(chunk, nbytes - start), dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path


def expert_ranges(file_bytes: int, expert_bytes: int, gap: int = 77) -> dict[int, list[tuple[int, int, int]]]:
    """Experts back to back with an odd gap, as safetensors lays tensors: not page-aligned."""
    ranges, offset, expert = {}, 13, 0
    while offset + expert_bytes <= file_bytes:
        ranges[expert] = [(0, offset, expert_bytes)]
        offset += expert_bytes + gap
        expert += 1
    return ranges


def sequential_read_seconds(path: str | Path, direct: bool) -> float:
    """Time to read the whole file in 4 MiB blocks, like dd; O_DIRECT or buffered.
    OSError (EINVAL) where the file system refuses O_DIRECT (tmpfs)."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, BLOCK_BYTES)  # page-aligned, as O_DIRECT requires
    fd = os.open(path, flags)
    try:
        start = time.perf_counter()
        offset = 0
        while n := os.preadv(fd, [buf], offset):
            offset += n
        return time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()


def cache_read_seconds(path: str | Path, expert_bytes: int, direct: bool, io_threads: int = 2) -> tuple[float, dict]:
    """Time to get every expert once through an ExpertCache big enough for two of them."""
    ranges = expert_ranges(os.path.getsize(path), expert_bytes)
    store = ExpertStore([str(path)], ranges, direct_io=direct)
    with ExpertCache(store, 2 * store.slot_bytes(0), "lru", io_threads) as cache:
        start = time.perf_counter()
        for key in ranges:
            cache.get(key)  # the buffer is dropped at once: unpinned, evictable
        return time.perf_counter() - start, dict(cache.stats(), expert_bytes=store.total_bytes())


@dataclass
class IoReport:
    file_bytes: int
    expert_bytes: int
    sequential_direct_gbps: float | None  # None where O_DIRECT is refused
    sequential_buffered_gbps: float
    cache_direct_gbps: float
    cache_buffered_gbps: float
    direct_io: bool
    direct_io_fallback: str


def measure_io(directory: str | Path, file_bytes: int, expert_bytes: int) -> IoReport:
    """Write a scratch file in `directory`, measure each way of reading it cold, delete it."""
    path = Path(directory) / f".moeedge-iobench-{os.getpid()}.bin"
    write_scratch_file(path, file_bytes)
    try:
        def gbps(seconds: float, nbytes: int) -> float:
            return nbytes / seconds / 1e9

        results: dict[str, float | None] = {}
        for name, direct in (("direct", True), ("buffered", False)):
            evict_files([path])
            try:
                results[f"sequential_{name}"] = gbps(sequential_read_seconds(path, direct), file_bytes)
            except OSError:
                results[f"sequential_{name}"] = None
            evict_files([path])
            seconds, stats = cache_read_seconds(path, expert_bytes, direct)
            results[f"cache_{name}"] = gbps(seconds, stats["expert_bytes"])
            if direct:
                direct_io, fallback = stats["direct_io"], stats["direct_io_fallback"]
        return IoReport(file_bytes, expert_bytes, results["sequential_direct"], results["sequential_buffered"],
                        results["cache_direct"], results["cache_buffered"], direct_io, fallback)
    finally:
        path.unlink(missing_ok=True)
