"""Benchmarks of the native expert cache: cold reads against the disk's ceiling, the hit
path of ``get``, and how much ``prefetch`` hides reads behind compute.

Run by hand, never in CI (see bench/README.md):
    pytest bench --benchmark-json=bench/results/core.json

Cases, named by what they measure (GB/s are decimal, 1e9 bytes/s):
  cold_read_dd[direct_4m|buffered_4m]   the whole file, front to back, 4 MiB requests: the ceiling
  cold_read_cache[<io>_get_t1]          ExpertCache.get of every expert once, one at a time
  cold_read_cache[<io>_prefetch_t<n>]   prefetch(all keys), then get each; n IO threads
  cold_read_cache[<io>_get_t1_budget4]  get one at a time with room for 4: reads into recycled slots
  hit_get[get|get_view_bf16]            get of a resident key (ns/op), bare or wrapped by torch
  overlap_n32[<io>_d<depth>]            32 x (get, then bf16 matvecs for as long as one read
                                        takes), with prefetch of the next <depth> keys or none
"""
from __future__ import annotations

import mmap
import os
import statistics
import time
import zlib

import pytest

pytest.importorskip("moeedge._core", reason="build the core first: pip install -e .")
torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from moeedge import ExpertCache, ExpertStore  # noqa: E402
from moeedge.expert_tensor import expert_view  # noqa: E402

GB = 1e9
HIT_ROUNDS = 30
HIT_ITERATIONS = int(os.environ.get("MOEEDGE_BENCH_HIT_ITERATIONS", "2000"))
OVERLAP_EXPERTS = 32
MATVEC_COLS = 4096  # an expert viewed as a bf16 [rows, 4096] weight


def median_seconds(benchmark) -> float | None:
    """Median seconds per iteration; None under --benchmark-disable (no statistics then)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None


def cache_info(stats: dict) -> dict:
    gets = stats["hits"] + stats["misses"]
    keep = ("hits", "misses", "prefetch_issued", "prefetch_hits", "prefetch_dropped",
            "bytes_read", "wait_seconds", "peak_resident_bytes", "budget_bytes")
    return {**{k: stats[k] for k in keep}, "hit_rate": stats["hits"] / gets if gets else None}


def crc32_of(buf) -> int:
    return zlib.crc32(memoryview(buf))


def skip_without_direct_io(bench_file, io: str) -> None:
    if io == "direct" and not bench_file.direct_io_supported:
        where = os.path.dirname(bench_file.path)
        pytest.skip(f"{where} refuses O_DIRECT (tmpfs?): set MOEEDGE_BENCH_DIR")


def open_store(bench_file, io: str, ranges=None) -> ExpertStore:
    store = ExpertStore([bench_file.path], ranges or bench_file.ranges, direct_io=io == "direct")
    # The file system takes O_DIRECT (checked when the file was made), so a fallback is a bug.
    assert store.direct_io == (io == "direct"), store.direct_io_fallback
    return store


class FreshCache:
    """A new cache per round (setup, not timed); the previous one is closed and dropped first."""

    def __init__(self, store: ExpertStore, budget_bytes: int, io_threads: int, cold):
        self.store, self.budget_bytes, self.io_threads, self.cold = store, budget_bytes, io_threads, cold
        self.cache: ExpertCache | None = None

    def setup(self):
        self.close()
        self.cold.evict()
        self.cache = ExpertCache(self.store, self.budget_bytes, "lru", self.io_threads)
        return (self.cache,), {}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None


# --- cold reads -------------------------------------------------------------------------

@pytest.mark.benchmark(group="cold_read")
@pytest.mark.parametrize("io", ["direct", "buffered"], ids=["direct_4m", "buffered_4m"])
def test_cold_read_dd(benchmark, bench_file, cold, cold_rounds, measured, io):
    """The ceiling: dd bs=4M of the whole file into one reused page-aligned buffer."""
    skip_without_direct_io(bench_file, io)
    flags = os.O_RDONLY | (os.O_DIRECT if io == "direct" else 0)
    buf = mmap.mmap(-1, bench_file.dd_chunk_bytes)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)

    def read_file() -> tuple[int, int]:
        fd = os.open(bench_file.path, flags)
        try:
            offset, sample_crc = 0, 0
            while (n := os.preadv(fd, [buf], offset)) > 0:
                sample_crc = zlib.crc32(view[:min(n, bench_file.dd_sample_bytes)], sample_crc)
                offset += n
            return offset, sample_crc
        finally:
            os.close(fd)

    def setup():
        cold.evict()

    n_read, sample_crc = benchmark.pedantic(read_file, setup=setup, rounds=cold_rounds)
    assert n_read == bench_file.file_bytes
    assert sample_crc == bench_file.dd_sample_crc32

    info = benchmark.extra_info
    info.update(cold.extra_info(), io=io, bytes=n_read, request_bytes=bench_file.dd_chunk_bytes)
    if (seconds := median_seconds(benchmark)) is not None:
        info["gb_per_s"] = measured[f"dd_{io}"] = n_read / seconds / GB


RECYCLED_BUDGET_EXPERTS = 4
CACHE_CASES = [(io, pattern, threads, budget) for io in ("direct", "buffered")
               for pattern, threads, budget in (("get", 1, "all"), ("prefetch", 1, "all"),
                                                ("prefetch", 2, "all"), ("get", 1, "budget4"))]


def cache_case_id(io: str, pattern: str, io_threads: int, budget: str) -> str:
    return f"{io}_{pattern}_t{io_threads}" + ("" if budget == "all" else f"_{budget}")


@pytest.mark.benchmark(group="cold_read")
@pytest.mark.parametrize("io,pattern,io_threads,budget", CACHE_CASES,
                         ids=[cache_case_id(*case) for case in CACHE_CASES])
def test_cold_read_cache(benchmark, bench_file, cold, cold_rounds, measured, io, pattern, io_threads,
                         budget):
    """Every expert once through a fresh cache. budget "all" holds them all (no eviction), so
    every read lands in freshly mapped memory; "budget4" holds 4, so after the first 4 every
    read lands in a slot recycled from an eviction, as in a cache running in steady state."""
    skip_without_direct_io(bench_file, io)
    store = open_store(bench_file, io)
    keys = bench_file.keys
    recycled = budget != "all"
    budget_keys = keys[:RECYCLED_BUDGET_EXPERTS] if recycled else keys
    fresh = FreshCache(store, sum(store.slot_bytes(k) for k in budget_keys), io_threads, cold)

    def read_every_expert(cache: ExpertCache) -> list:
        if pattern == "prefetch":
            cache.prefetch(keys)
        if recycled:  # every buffer kept pinned would not fit: checksum each one's head instead
            return [zlib.crc32(memoryview(cache.get(k))[:bench_file.head_bytes]) for k in keys]
        return [cache.get(k) for k in keys]

    result = benchmark.pedantic(read_every_expert, setup=fresh.setup, rounds=cold_rounds)
    stats = fresh.cache.stats()
    got = result if recycled else [crc32_of(b) for b in result]
    del result
    fresh.close()
    assert got == [(bench_file.head_crc32 if recycled else bench_file.crc32)[k] for k in keys]
    assert stats["hits"] + stats["misses"] == len(keys)
    assert stats["bytes_read"] >= bench_file.expert_bytes
    assert stats["evictions"] == (len(keys) - len(budget_keys))
    if pattern == "get":
        assert (stats["misses"], stats["prefetch_issued"]) == (len(keys), 0)
    else:
        assert stats["prefetch_issued"] + stats["misses"] >= len(keys)

    info = benchmark.extra_info
    info.update(cold.extra_info() | cache_info(stats), io=io, pattern=pattern, io_threads=io_threads,
                budget_experts=len(budget_keys), evictions=stats["evictions"],
                bytes=bench_file.expert_bytes, n_experts=len(keys), direct_io=store.direct_io,
                read_amplification=stats["bytes_read"] / bench_file.expert_bytes)
    if (seconds := median_seconds(benchmark)) is not None:
        gbps = bench_file.expert_bytes / seconds / GB
        info["gb_per_s"] = measured["cache_" + cache_case_id(io, pattern, io_threads, budget)] = gbps
        for ceiling in ("dd_direct", "dd_buffered"):
            if ceiling in measured:  # measured earlier in this same run
                info[f"fraction_of_{ceiling}"] = gbps / measured[ceiling]


# --- hit path ---------------------------------------------------------------------------

@pytest.mark.benchmark(group="hit_get")
@pytest.mark.parametrize("with_view", [False, True], ids=["get", "get_view_bf16"])
def test_hit_get(benchmark, bench_file, with_view):
    """get of a resident key: lookup, pin, the ExpertBuffer object and its release."""
    key = bench_file.keys[0]
    store = open_store(bench_file, "buffered", {key: bench_file.ranges[key]})
    cache = ExpertCache(store, store.slot_bytes(key), "lru", 1)
    assert crc32_of(cache.get(key)) == bench_file.crc32[key]  # the one miss, before timing
    cache.reset_stats()

    if with_view:
        def target():
            return expert_view(cache.get(key), torch.bfloat16)
        args = ()
    else:
        target, args = cache.get, (key,)
    benchmark.pedantic(target, args=args, rounds=HIT_ROUNDS, iterations=HIT_ITERATIONS, warmup_rounds=1)

    stats = cache.stats()
    assert crc32_of(cache.get(key)) == bench_file.crc32[key]
    cache.close()
    assert stats["misses"] == 0
    if not benchmark.disabled:
        # warm-up round, timed rounds, and one more call pytest-benchmark makes for the result
        assert stats["hits"] == (HIT_ROUNDS + 1) * HIT_ITERATIONS + 1

    info = benchmark.extra_info
    info.update(cache_info(stats), expert_bytes=store.nbytes(key), torch_view=with_view)
    if (seconds := median_seconds(benchmark)) is not None:
        info["ns_per_get"] = seconds * 1e9


# --- prefetch overlap -------------------------------------------------------------------

@pytest.fixture
def one_torch_thread():
    """Compute on one core, so the IO threads have the other (the machines have two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


def matvec_for(buf, seconds: float) -> int:
    """Stand-in for an expert's FFN: bf16 matvecs over the expert's bytes until `seconds` pass.
    A fixed duration, so both sides of the comparison compute exactly as long."""
    rows = len(buf) // (2 * MATVEC_COLS)
    w = expert_view(buf, torch.bfloat16, count=rows * MATVEC_COLS).view(rows, MATVEC_COLS)
    x = torch.ones(MATVEC_COLS, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    n = 0
    while True:
        F.linear(x, w)  # [rows, cols] @ [cols] -> [rows]; random bytes give NaNs too, at no extra cost
        n += 1
        if time.perf_counter() >= deadline:
            return n


@pytest.fixture(scope="module")
def read_seconds(bench_file, evict) -> float:
    """Median cold read of one expert through the cache, one at a time: the compute per
    expert in the overlap cases is set equal to it (MOEEDGE_BENCH_COMPUTE_MS overrides)."""
    if "MOEEDGE_BENCH_COMPUTE_MS" in os.environ:
        return float(os.environ["MOEEDGE_BENCH_COMPUTE_MS"]) / 1e3
    io = "direct" if bench_file.direct_io_supported else "buffered"
    store = open_store(bench_file, io)
    keys = bench_file.keys[:8]
    evict()
    with ExpertCache(store, sum(store.slot_bytes(k) for k in keys), "lru", 1) as cache:
        times = []
        for k in keys:
            t0 = time.perf_counter()
            cache.get(k)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


OVERLAP_CASES = [("direct", 0), ("direct", 2), ("buffered", 0), ("buffered", 2)]


@pytest.mark.benchmark(group="prefetch_overlap")
@pytest.mark.parametrize("io,depth", OVERLAP_CASES, ids=[f"{io}_d{d}" for io, d in OVERLAP_CASES])
def test_overlap_n32(benchmark, bench_file, cold, cold_rounds, measured, read_seconds,
                     one_torch_thread, io, depth):
    """for k in 32 experts: prefetch(next `depth` keys); get(k); compute as long as a read."""
    skip_without_direct_io(bench_file, io)
    store = open_store(bench_file, io)
    keys = bench_file.keys[:OVERLAP_EXPERTS]
    n = len(keys)
    fresh = FreshCache(store, sum(store.slot_bytes(k) for k in keys), 2, cold)
    compute_seconds = read_seconds
    matvecs = []

    def run_experts(cache: ExpertCache) -> None:
        done = 0
        for i, key in enumerate(keys):
            if depth:
                cache.prefetch(keys[i + 1:i + 1 + depth])
            done += matvec_for(cache.get(key), compute_seconds)
        matvecs.append(done)

    benchmark.pedantic(run_experts, setup=fresh.setup, rounds=cold_rounds)
    stats = fresh.cache.stats()
    assert [crc32_of(fresh.cache.get(k)) for k in keys] == [bench_file.crc32[k] for k in keys]
    fresh.close()
    assert stats["hits"] + stats["misses"] == n
    if depth == 0:
        assert (stats["misses"], stats["prefetch_issued"]) == (n, 0)
    else:
        assert stats["prefetch_issued"] > 0

    info = benchmark.extra_info
    info.update(cold.extra_info() | cache_info(stats), io=io, depth=depth, n_experts=n, io_threads=2,
                torch_threads=one_torch_thread, read_seconds_per_expert=read_seconds,
                compute_seconds_per_expert=compute_seconds, matvecs_last_round=matvecs[-1],
                # napkin maths: reads and compute one after the other, or fully overlapped
                serial_model_seconds=n * (read_seconds + compute_seconds),
                overlapped_model_seconds=n * max(read_seconds, compute_seconds)
                + min(read_seconds, compute_seconds))
    if (seconds := median_seconds(benchmark)) is not None:
        info["wall_seconds"] = measured[f"overlap_{io}_d{depth}"] = seconds
        if depth and f"overlap_{io}_d0" in measured:  # measured earlier in this same run
            info["speedup_vs_d0"] = measured[f"overlap_{io}_d0"] / seconds
