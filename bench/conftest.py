"""Fixtures for the core benchmarks: one data file on a real disk, cut into experts.

The file is laid out like a safetensors checkpoint: a header, then experts back to back
with an odd gap between them, so no expert starts on a page boundary. Its bytes are
random and never zero, so a region the cache forgot to read cannot pass a checksum.

Environment:
  MOEEDGE_BENCH_DIR      where the data file goes (default /var/tmp/moeedge-bench); it
                         must be on a disk file system (O_DIRECT), not tmpfs.
  MOEEDGE_BENCH_FILE_MB  size of the data file in MiB (default 512).
  MOEEDGE_BENCH_ROUNDS   rounds of each cold case (default 5).
"""
from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import zlib

import numpy as np
import pytest

MiB = 1 << 20
PAGE_BYTES = mmap.PAGESIZE

BENCH_DIR = os.environ.get("MOEEDGE_BENCH_DIR", "/var/tmp/moeedge-bench")
FILE_MB = int(os.environ.get("MOEEDGE_BENCH_FILE_MB", "512"))
COLD_ROUNDS = int(os.environ.get("MOEEDGE_BENCH_ROUNDS", "5"))

EXPERT_BYTES = 8 * MiB
EXPERTS_PER_LAYER = 8          # keys are (layer, expert) as in a Mixtral-style model
HEADER_BYTES = 12_345          # like safetensors' 8-byte length + JSON: experts start unaligned
GAP_BYTES = 4_321              # another tensor between experts: odd, so every offset differs mod 4096
DD_CHUNK_BYTES = 4 * MiB       # request size of the dd-style ceiling reads
DD_SAMPLE_BYTES = 4096         # the dd reads checksum the first 4 KiB of each chunk
HEAD_BYTES = 4096              # checksummed inside a timed loop where whole experts cannot be kept


@dataclasses.dataclass(frozen=True)
class BenchFile:
    path: str
    file_bytes: int
    ranges: dict[int, list[tuple[int, int, int]]]  # key -> [(file_index, offset, length)]
    crc32: dict[int, int]                          # key -> crc32 of the expert's bytes
    head_crc32: dict[int, int]                     # key -> crc32 of the expert's first 4 KiB
    dd_sample_crc32: int                           # chained crc32 of each chunk's first 4 KiB
    direct_io_supported: bool
    dd_chunk_bytes: int = DD_CHUNK_BYTES
    dd_sample_bytes: int = DD_SAMPLE_BYTES
    head_bytes: int = HEAD_BYTES

    @property
    def keys(self) -> list[int]:
        return list(self.ranges)

    @property
    def expert_bytes(self) -> int:
        """Sum of the experts' bytes (what a cache reads; the file also has header and gaps)."""
        return sum(length for segs in self.ranges.values() for _, _, length in segs)


def expert_key(layer: int, expert: int) -> int:
    return layer << 32 | expert  # same packing as moeedge.ExpertKey


def _layout(n_experts: int) -> dict[int, list[tuple[int, int, int]]]:
    ranges = {}
    offset = HEADER_BYTES
    for i in range(n_experts):
        key = expert_key(i // EXPERTS_PER_LAYER, i % EXPERTS_PER_LAYER)
        ranges[key] = [(0, offset, EXPERT_BYTES)]
        offset += EXPERT_BYTES + GAP_BYTES
    return ranges


def _write_data(path: str, file_bytes: int) -> None:
    """Random non-zero bytes: one 64 MiB random block, rotated by a different odd amount per chunk."""
    block = np.random.default_rng(0).integers(1, 256, size=64 * MiB, dtype=np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        for i in range(-(-file_bytes // block.size)):
            chunk = np.roll(block, 4097 * i + 1)[: file_bytes - written]
            os.write(fd, chunk.data)
            written += chunk.size
        os.fsync(fd)
    finally:
        os.close(fd)


def _reference_checksums(path: str, ranges) -> tuple[dict[int, int], dict[int, int], int]:
    """Read back through the page cache (the file was just written, so it is still there)."""
    crcs, head_crcs = {}, {}
    with open(path, "rb", buffering=0) as f:
        for key, segs in ranges.items():
            data = b"".join(os.pread(f.fileno(), length, offset) for _, offset, length in segs)
            crcs[key] = zlib.crc32(data)
            head_crcs[key] = zlib.crc32(data[:HEAD_BYTES])
        size = os.fstat(f.fileno()).st_size
        sample = 0
        for offset in range(0, size, DD_CHUNK_BYTES):
            sample = zlib.crc32(os.pread(f.fileno(), DD_SAMPLE_BYTES, offset), sample)
    return crcs, head_crcs, sample


def _supports_direct_io(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, PAGE_BYTES)
        return os.preadv(fd, [buf], 0) == PAGE_BYTES
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def bench_file():
    if FILE_MB < 2 * EXPERT_BYTES // MiB:
        pytest.fail(f"MOEEDGE_BENCH_FILE_MB={FILE_MB} is too small: at least two 8 MiB experts")
    os.makedirs(BENCH_DIR, exist_ok=True)
    path = os.path.join(BENCH_DIR, f"experts-{os.getpid()}.bin")
    n_experts = FILE_MB * MiB // EXPERT_BYTES
    ranges = _layout(n_experts)
    file_bytes = HEADER_BYTES + n_experts * (EXPERT_BYTES + GAP_BYTES)
    try:
        _write_data(path, file_bytes)
        crcs, head_crcs, sample = _reference_checksums(path, ranges)
        yield BenchFile(path, file_bytes, ranges, crcs, head_crcs, sample, _supports_direct_io(path))
    finally:
        if os.path.exists(path):
            os.remove(path)
        try:
            os.rmdir(BENCH_DIR)  # only when empty: never remove what someone else put there
        except OSError:
            pass


@pytest.fixture(scope="session")
def measured() -> dict[str, float]:
    """Figures (GB/s, seconds) of cases already run this session, so later cases can report
    ratios against cases measured side by side in the same run (GB/s as a fraction of dd)."""
    return {}


# --- page cache -----------------------------------------------------------------------

def evict_page_cache(path: str) -> bool:
    """Drop the file's pages from the page cache (fsync first: dirty pages are not dropped).
    Returns True when the advice was given; see ``page_cache_fraction`` for whether it took."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def page_cache_fraction(path: str) -> float | None:
    """Fraction of the file's pages in the page cache (mincore on a mapping that is never
    touched, so asking does not load anything). None where mincore is not available."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return None
        try:
            n_pages = -(-size // PAGE_BYTES)
            vec = (ctypes.c_ubyte * n_pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return float(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)) / n_pages
        finally:
            _libc.munmap(addr, size)
    except (OSError, AttributeError):
        return None
    finally:
        os.close(fd)


class ColdRounds:
    """Evicts the file before each round and remembers whether that worked, for extra_info."""

    def __init__(self, path: str):
        self.path = path
        self.evicted: list[bool] = []
        self.resident: list[float | None] = []

    def evict(self) -> None:
        self.evicted.append(evict_page_cache(self.path))
        self.resident.append(page_cache_fraction(self.path))

    def extra_info(self) -> dict:
        known = [r for r in self.resident if r is not None]
        return {
            "page_cache_evicted": bool(self.evicted) and all(self.evicted),
            "page_cache_fraction_after_evict": max(known) if known else None,
        }


@pytest.fixture
def cold(bench_file) -> ColdRounds:
    """Call ``cold.evict()`` in a benchmark's setup to start each round from disk."""
    return ColdRounds(bench_file.path)


@pytest.fixture(scope="session")
def evict(bench_file):
    """Drop the data file from the page cache (for a one-off cold measurement)."""
    return lambda: evict_page_cache(bench_file.path)


@pytest.fixture(scope="session")
def cold_rounds() -> int:
    return COLD_ROUNDS
