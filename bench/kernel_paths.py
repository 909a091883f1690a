"""The native kernels on each SIMD path this CPU has, side by side on the same bytes.

    python bench/kernel_paths.py [--formats bf16,q8_0,q4_k,int8_g32,int4_g32] [--tokens 1,16]
        [--threads 1,0] [--rows 14336 --cols 4096] [--reps 20] [--copies 1] [--json OUT]

One expert matrix (Mixtral-8x7B's w1 shape by default) per format, timed on every path
(scalar is left out: it is there for portability, not speed), the paths alternating call by
call so that machine noise hits all of them; threads 0 means every core. Prints the median
time, GB/s of stored weight bytes and each path's speed relative to the narrowest SIMD path,
and checks that the paths agree (the same integer sums; only float rounding differs).
--copies N cycles each call through N copies of the weights, so that a matrix the CPU's
caches would hold (3584 x 1024) is read from memory, as a decode step reads its experts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from moeedge import _core


def weights(fmt: str, rows: int, cols: int) -> tuple[tuple, int]:
    """(the kernel's weight arguments, stored bytes) for random weights in `fmt`."""
    gen = torch.Generator().manual_seed(0)
    if fmt == "bf16":
        w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16).view(torch.int16).numpy()
        return (w,), w.nbytes
    if fmt == "q8_0":
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 256, size=(rows * cols // 32, 34), dtype=np.uint8)
        blocks[:, :2] = (np.abs(rng.normal(0, 1e-3, size=(len(blocks), 1))) + 1e-4).astype(np.float16).view(np.uint8)
        return (blocks.reshape(-1),), blocks.nbytes
    if fmt == "q4_k":  # random codes and 6-bit scales, finite fp16 d and dmin (gguf cannot quantize to Q4_K)
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
        d = rng.uniform(1e-4, 3e-4, size=(len(blocks), 1)).astype(np.float16)
        blocks[:, 0:2], blocks[:, 2:4] = d.view(np.uint8), (7.5 * d).astype(np.float16).view(np.uint8)
        return (blocks.reshape(-1),), blocks.nbytes
    from moeedge.formats.group_quant import QUANTS, quantize

    q, s = quantize(torch.randn(rows, cols, generator=gen) * 0.02, *QUANTS[fmt])
    return (q.view(torch.uint8).numpy(), s.view(torch.uint8).numpy(), QUANTS[fmt][1]), q.numel() * q.element_size() + s.numel() * 2


def call(fmt: str, x: np.ndarray, args: tuple, out: np.ndarray, threads: int) -> None:
    if fmt == "bf16":
        _core.linear_bf16(x, args[0], out, threads)
    elif fmt in ("q8_0", "q4_k"):
        getattr(_core, f"linear_{fmt}")(x, args[0], out, threads)
    else:
        kernel = _core.linear_int8 if fmt.startswith("int8") else _core.linear_int4
        kernel(x, args[0], args[1], out, args[2], threads)


def measure(fmt: str, tokens: int, threads: int, rows: int, cols: int, reps: int, paths: list[str],
            copies: int = 1) -> dict:
    args, nbytes = weights(fmt, rows, cols)
    copied = [args] + [tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args) for _ in range(copies - 1)]
    x = np.random.default_rng(tokens).standard_normal((tokens, cols)).astype(np.float32)
    outs = {p: np.empty((tokens, rows), np.float32) for p in paths}
    times: dict[str, list[float]] = {p: [] for p in paths}
    try:
        for rep in range(reps + 1):
            for i, p in enumerate(paths):
                _core.linear_force_path(p)
                start = time.perf_counter()
                call(fmt, x, copied[(rep * len(paths) + i) % copies], outs[p], threads)
                if rep:  # the first round warms caches and the thread pool
                    times[p].append(time.perf_counter() - start)
    finally:
        _core.linear_force_path("")
    ref = outs[paths[0]]
    scale = float(np.abs(ref).max()) or 1.0
    record = {"format": fmt, "tokens": tokens, "threads": threads or os.cpu_count(), "rows": rows, "cols": cols,
              "bytes": nbytes, "copies": copies, "paths": {}}
    for p in paths:
        median = statistics.median(times[p])
        record["paths"][p] = {"median_ms": median * 1e3, "gb_per_s": nbytes / median / 1e9,
                              "speedup": statistics.median(times[paths[0]]) / median,
                              "max_rel_diff": float(np.abs(outs[p] - ref).max()) / scale}
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/kernel_paths.py")
    parser.add_argument("--formats", default="bf16,q8_0,int8_g32,int4_g32")
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--threads", default="1,0")
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--copies", type=int, default=1, help="copies of the weights the calls cycle through")
    parser.add_argument("--json", default=None)
    a = parser.parse_args(argv)
    paths = [p for p in _core.linear_paths() if p != "scalar"]
    if not paths:
        print("this CPU has no SIMD path to compare", file=sys.stderr)
        return 2
    print(f"paths {paths}; cpu {[k for k, v in _core.cpu_features().items() if v]}", flush=True)
    records = []
    for fmt in a.formats.split(","):
        for tokens in map(int, a.tokens.split(",")):
            for threads in map(int, a.threads.split(",")):
                r = measure(fmt, tokens, threads, a.rows, a.cols, a.reps, paths, max(1, a.copies))
                records.append(r)
                cells = "  ".join(f"{p} {v['median_ms']:8.3f} ms {v['gb_per_s']:6.1f} GB/s x{v['speedup']:.2f} "
                                  f"(diff {v['max_rel_diff']:.1e})" for p, v in r["paths"].items())
                print(f"{fmt:9s} T={tokens:<3d} threads={r['threads']:<3d} {cells}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
