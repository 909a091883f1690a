"""Prefill-sized products on bf16 (and fp32) weights: moeedge.kernels.linear, which takes
the native kernel for any number of tokens, against the torch path it replaced above
NATIVE_MAX_TOKENS (the weights converted to fp32 CONVERT_BLOCK_BYTES at a time, then
torch's GEMM; fp32: F.linear), the two alternating call by call so that machine noise hits
both.

    python bench/prefill_dense.py [--shapes 2048x1024,1024x2048,14336x4096,4096x14336]
        [--tokens 64,128] [--dtypes bf16] [--reps 7] [--threads 0] [--path avx2] [--cpu-time]

A shape is the weight matrix's out x in. Prints each side's median and native / torch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from moeedge import _core, kernels

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def torch_path(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w) if w.dtype == x.dtype else kernels._linear_converting(x, w, None)


def measure(rows: int, cols: int, tokens: int, dtype: torch.dtype, reps: int, clock=time.perf_counter) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
    x = torch.randn(tokens, cols, generator=gen)
    sides = {"native": lambda: kernels.linear(x, w), "torch": lambda: torch_path(x, w)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    outs = {}
    for rep in range(reps + 1):
        for name, fn in sides.items():
            start = clock()
            outs[name] = fn()
            if rep:  # the first round warms caches and both thread pools
                times[name].append(clock() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((outs["native"] - outs["torch"]).abs().max() / outs["torch"].abs().max())
    return {"native_ms": med["native"] * 1e3, "torch_ms": med["torch"] * 1e3, "ratio": med["torch"] / med["native"],
            "max_rel_diff": diff}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/prefill_dense.py")
    p.add_argument("--shapes", default="2048x1024,1024x2048,14336x4096,4096x14336")
    p.add_argument("--tokens", default="64,128")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="kernel and torch threads (0: as they are)")
    p.add_argument("--path", default="", help="force a kernel path (scalar, avx2, avx512)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the calling thread's CPU time, not the wall clock (with --threads 1 both sides run "
                        "on that thread: less noise on a shared machine)")
    a = p.parse_args(argv)
    if a.threads:
        _core.set_kernel_threads(a.threads)
        torch.set_num_threads(a.threads)
    _core.linear_force_path(a.path)
    print(f"path {_core.linear_path()}, kernel threads {_core.kernel_threads()}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}", flush=True)
    for dtype in a.dtypes.split(","):
        for shape in a.shapes.split(","):
            rows, cols = map(int, shape.split("x"))
            for tokens in map(int, a.tokens.split(",")):
                r = measure(rows, cols, tokens, DTYPES[dtype], a.reps, time.thread_time if a.cpu_time else time.perf_counter)
                print(f"{dtype:4s} w {rows}x{cols} T={tokens:<4d} native {r['native_ms']:9.2f} ms  torch "
                      f"{r['torch_ms']:9.2f} ms  native speed x{r['ratio']:.2f}  (diff {r['max_rel_diff']:.1e})",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
