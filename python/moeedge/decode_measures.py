"""The prompt every engine of the benchmark harness decodes from, and the latency summary
each prints: numpy and the standard library only, so that llama.cpp's measurement can run
under an interpreter that has llama-cpp-python but not moeedge (moeedge.harness.llama_build)."""
from __future__ import annotations

import statistics

import numpy as np


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """n token ids in [3, vocab): past the usual special ids (unk, bos, eos)."""
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def storage_read_bytes() -> int:
    """Bytes this process (all of its threads) has had read from storage: /proc/self/io's
    read_bytes, direct reads and page-cache fills (an mmap's faults) alike; 0 where unreadable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def latency_summary(seconds: list[float]) -> dict:
    """Decode tokens/s (median) and p50/p99 per-token latency of the generated tokens after
    the first; steady_tok_s from the last half only, once a cold start has read what it needs."""
    if not seconds:
        return {"decode_tok_s": 0.0, "steady_tok_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(seconds)
    median = statistics.median(seconds)
    return {"decode_tok_s": 1 / median, "steady_tok_s": 1 / statistics.median(seconds[len(seconds) // 2:]),
            "p50_ms": 1000 * median, "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}
