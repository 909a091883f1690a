#!/usr/bin/env python
"""moeedge's native matrix-vector kernels against llama.cpp's own ggml CPU kernels on the
same tensor bytes, in one run (issue #6: "on par or better than llama.cpp's CPU kernels on
the same tensor").

For each format x tokens T x threads: random GGUF blocks W [rows, cols] and x [T, cols] are
written once to temporary files; bench/ggml_matvec.c (compiled here against a llama.cpp
build's libggml) times out = ggml_mul_mat(W, x) on those bytes, and moeedge._core.linear_*
times the same product in this process, with the same thread count and repetitions. The
two engines alternate, round after round, so machine noise hits both. The outputs must
agree: ggml rounds x to 8 bits per block (Q8_0 for q8_0/q4_0, Q8_K for the K-quants) and to
bf16 for bf16, so the check is max|ggml - moeedge| / max|moeedge| <= --tol. Each engine's
error against a float64 product of W dequantized (moeedge.formats.gguf_quants) is shown too.

ggml runs in two modes where this ggml offers both: `plain` (W in an ordinary CPU buffer:
vec_dot, llamafile's sgemm or the tiled K-quant path) and `repack` (W in the CPU_REPACK
buffer type, which is how llama.cpp loads weights by default; on AVX2 only Q4_0 and Q4_K
have a repacked layout, the other formats skip this mode).

    python bench/ggml_compare.py                                  # 14336 x 4096, T 1,16, threads 1,2
    python bench/ggml_compare.py --formats q8_0 --rows 1024 --json /tmp/ggml.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_LIB = "/var/tmp/llama-build/bin"
DEFAULT_INCLUDE_GLOB = "/var/tmp/llama-src/*/vendor/llama.cpp/ggml/include"
FORMATS = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "bf16"]
BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}  # values, bytes
SCALE_OFFSETS = {"q8_0": [0], "q4_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}  # fp16 d (and dmin) in a block
LIBS = ["libggml.so", "libggml-base.so", "libggml-cpu.so"]
HEADERS = ["ggml.h", "ggml-cpu.h", "ggml-backend.h", "ggml-alloc.h"]


def refuse(message: str) -> None:
    print(f"ggml_compare: {message}", file=sys.stderr)
    sys.exit(2)


def weight_bytes(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """W as stored, uint8. GGUF blocks: random bytes with small finite fp16 scales (as in
    bench/test_bench_kernels.py::_gguf_blocks; speed does not depend on the values).
    bf16: normal values, truncated from float32."""
    if fmt == "bf16":
        bits = rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(-1)
    block, block_bytes = BLOCKS[fmt]
    blocks = rng.integers(0, 256, size=(rows * cols // block, block_bytes), dtype=np.uint8)
    for at in SCALE_OFFSETS[fmt]:
        scale = np.abs(rng.normal(0, 1e-3, size=(len(blocks), 1))) + 1e-4
        blocks[:, at:at + 2] = scale.astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


def reference(fmt: str, w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """W as float64 [rows, cols]."""
    if fmt == "bf16":
        return (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(rows, cols).astype(np.float64)
    import torch

    from moeedge.formats.gguf_quants import dequantize

    return dequantize(torch.from_numpy(w), fmt, (rows, cols), torch.float32).numpy().astype(np.float64)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def ggml_path(fmt: str, tokens: int, mode: str) -> str:
    """The kernel this ggml's ggml_compute_forward_mul_mat takes (read from its source,
    ggml-cpu.c, tiled/tiled.cpp, llamafile/sgemm.cpp, repack.cpp, for an AVX2 build)."""
    if mode == "repack":
        return "repack gemv" if tokens < 4 else "repack gemm"
    if tokens >= 8 and fmt in ("q4_k", "q5_k", "q6_k"):
        return "tiled"
    if tokens >= 2 and fmt in ("q8_0", "q4_0", "bf16"):
        return "sgemm"
    return "vec_dot"


def compile_helper(cc: str, include: Path, lib: Path, workdir: Path) -> Path:
    exe = workdir / "ggml_matvec"
    cmd = [cc, "-O2", "-o", str(exe), str(HERE / "ggml_matvec.c"), f"-I{include}", f"-L{lib}",
           "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{lib}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        refuse(f"compiling ggml_matvec.c failed:\n{' '.join(cmd)}\n{done.stderr.strip()}")
    return exe


def run_ggml(exe: Path, fmt: str, rows: int, cols: int, tokens: int, threads: int, reps: int,
             w_file: Path, x_file: Path, out_file: Path, mode: str) -> list[float] | None:
    """Per-call seconds, or None when this ggml has no `mode` layout for fmt."""
    cmd = [str(exe), fmt, str(rows), str(cols), str(tokens), str(threads), str(reps),
           str(w_file), str(x_file), str(out_file), mode]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("times_ms"))
    return [float(t) / 1e3 for t in line.split()[1:]]


def run_moeedge(fn, x: np.ndarray, w: np.ndarray, out: np.ndarray, threads: int, reps: int) -> list[float]:
    fn(x, w, out, threads)  # warm-up, as the C helper does
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x, w, out, threads)
        times.append(time.perf_counter() - t0)
    return times


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prompt", action="store_true",
                    help="moeedge's prompt kernels where a format has one (Q4_K, Q5_K, Q6_K: x rounded per 256)")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", type=int, default=14336)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15, help="timed calls per engine per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per case, the engines' order alternating")
    ap.add_argument("--ggml-modes", default="plain,repack", help="plain, repack or both")
    ap.add_argument("--tol", type=float, default=2e-2, help="max |ggml - moeedge| / max |moeedge|")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lib", default=DEFAULT_LIB, help="folder with libggml*.so")
    ap.add_argument("--include", default=None, help=f"folder with ggml.h (default: {DEFAULT_INCLUDE_GLOB})")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"))
    ap.add_argument("--json", default=None, help="write the records here")
    return ap.parse_args()


def checked_setup(args: argparse.Namespace) -> tuple[list[str], list[int], list[int], list[str], Path, Path]:
    """(formats, token counts, thread counts, ggml modes, ggml's library and include folders);
    refuses, naming what is wrong, before anything is compiled or timed."""
    formats = [f for f in args.formats.split(",") if f]
    tokens_list = [int(t) for t in args.tokens.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]
    modes = [m for m in args.ggml_modes.split(",") if m]
    if bad := [f for f in formats if f not in FORMATS]:
        refuse(f"unknown formats {bad}; known: {FORMATS}")
    if bad := [m for m in modes if m not in ("plain", "repack")]:
        refuse(f"unknown ggml modes {bad}; known: plain, repack")
    if any(args.cols % BLOCKS.get(f, (32,))[0] for f in formats):
        refuse(f"--cols {args.cols} must be a multiple of each format's block (32; 256 for the K-quants)")
    lib = Path(args.lib)
    if missing := [n for n in LIBS if not (lib / n).exists()]:
        refuse(f"llama.cpp's ggml libraries not found in {lib} (missing {', '.join(missing)}); pass --lib")
    include = args.include or next(iter(sorted(glob.glob(DEFAULT_INCLUDE_GLOB))), None)
    if include is None:
        refuse(f"ggml headers not found ({DEFAULT_INCLUDE_GLOB}); pass --include")
    include = Path(include)
    if missing := [n for n in HEADERS if not (include / n).exists()]:
        refuse(f"ggml headers not found in {include} (missing {', '.join(missing)}); pass --include")
    if shutil.which(args.cc) is None:
        refuse(f"C compiler {args.cc!r} not found; pass --cc")
    return formats, tokens_list, threads_list, modes, lib, include


def time_case(args, exe: Path, tmp: Path, fmt: str, fn, x: np.ndarray, w_arg, w_file: Path, out: np.ndarray,
              tokens: int, threads: int, mode: str, first: int) -> tuple[list[float], list[float]] | None:
    """Each engine's call times over args.rounds rounds, which engine goes first alternating
    (from `first`); None where ggml has no such layout (repack) for this format here."""
    ggml_times, moe_times = [], []
    for r in range(args.rounds):
        for engine in (("ggml", "moeedge") if (first + r) % 2 == 0 else ("moeedge", "ggml")):
            if engine == "ggml":
                t = run_ggml(exe, fmt, args.rows, args.cols, tokens, threads, args.reps, w_file,
                             tmp / f"x{tokens}.bin", tmp / "out.bin", mode)
                if t is None:
                    return None
                ggml_times += t
            else:
                moe_times += run_moeedge(fn, x, w_arg, out, threads, args.reps)
    return ggml_times, moe_times


def case_record(args, fmt: str, tokens: int, threads: int, mode: str, w: np.ndarray, times, got: np.ndarray,
                out: np.ndarray, expected: np.ndarray, load_before: float) -> dict:
    ggml_times, moe_times = times
    rel = rel_err(got, out.astype(np.float64))
    g, m = statistics.median(ggml_times), statistics.median(moe_times)
    return {"format": fmt, "tokens": tokens, "threads": threads, "ggml_mode": mode,
            "ggml_path": ggml_path(fmt, tokens, mode), "rows": args.rows, "cols": args.cols,
            "weight_bytes": int(w.nbytes), "ggml_s": g, "moeedge_s": m, "ratio": g / m,
            "ggml_gb_s": w.nbytes / g / 1e9, "moeedge_gb_s": w.nbytes / m / 1e9,
            "ggml_min_s": min(ggml_times), "moeedge_min_s": min(moe_times),
            "ratio_min": min(ggml_times) / min(moe_times), "max_rel_diff": rel,
            "ggml_err": rel_err(got, expected), "moeedge_err": rel_err(out, expected), "agree": rel <= args.tol,
            "calls": len(ggml_times), "load_average": [load_before, os.getloadavg()[0]]}


def print_record(rec: dict) -> None:
    print(f"{rec['format']:6} {rec['tokens']:3} {rec['threads']:3} {rec['ggml_path']:12} {rec['ggml_s'] * 1e3:8.3f} "
          f"{rec['moeedge_s'] * 1e3:8.3f} {rec['ratio']:6.2f} {rec['ratio_min']:6.2f} {rec['ggml_gb_s']:9.2f} "
          f"{rec['moeedge_gb_s']:8.2f} {rec['max_rel_diff']:8.1e} {rec['ggml_err']:8.1e} {rec['moeedge_err']:8.1e}"
          f"{'' if rec['agree'] else '  MISMATCH'}", flush=True)


def run_cases(args, formats, tokens_list, threads_list, modes, lib: Path, include: Path, core) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory(prefix="ggml_compare_") as tmp:
        tmp = Path(tmp)
        exe = compile_helper(args.cc, include, lib, tmp)
        rng = np.random.default_rng(args.seed)
        xs = {}
        for tokens in tokens_list:
            xs[tokens] = rng.standard_normal((tokens, args.cols), dtype=np.float32)
            xs[tokens].tofile(tmp / f"x{tokens}.bin")
        print(f"{args.rows} x {args.cols}; {args.reps} calls x {args.rounds} rounds per engine and case; "
              f"moeedge path {core.linear_path()}; ggml from {lib}", flush=True)
        header = (f"{'format':6} {'T':>3} {'thr':>3} {'ggml path':12} {'ggml ms':>8} {'moe ms':>8} "
                  f"{'ratio':>6} {'r(min)':>6} {'ggml GB/s':>9} {'moe GB/s':>8} {'diff':>8} {'ggml err':>8} "
                  f"{'moe err':>8}")
        print(header)
        print("-" * len(header), flush=True)
        for fmt in formats:
            w = weight_bytes(fmt, args.rows, args.cols, rng)
            w_file = tmp / f"w_{fmt}.bin"
            w.tofile(w_file)
            w_arg = w.view(np.int16).reshape(args.rows, args.cols) if fmt == "bf16" else w
            fn = getattr(core, f"linear_{fmt}_x256" if args.prompt and hasattr(core, f"linear_{fmt}_x256")
                         else f"linear_{fmt}")
            dense = reference(fmt, w, args.rows, args.cols)
            expected = {t: xs[t].astype(np.float64) @ dense.T for t in tokens_list}
            del dense
            for tokens in tokens_list:
                for threads in threads_list:
                    for mode in modes:
                        out = np.empty((tokens, args.rows), dtype=np.float32)
                        load_before = os.getloadavg()[0]
                        times = time_case(args, exe, tmp, fmt, fn, xs[tokens], w_arg, w_file, out, tokens, threads,
                                          mode, len(records))
                        if times is None:  # no repacked layout for this format here
                            continue
                        got = np.fromfile(tmp / "out.bin", dtype=np.float32).reshape(tokens, args.rows)
                        records.append(case_record(args, fmt, tokens, threads, mode, w, times, got, out,
                                                   expected[tokens], load_before))
                        print_record(records[-1])
    return records


def main() -> int:
    args = parse_args()
    formats, tokens_list, threads_list, modes, lib, include = checked_setup(args)
    try:
        from moeedge import _core
    except ImportError as e:
        refuse(f"moeedge._core cannot be imported ({e}); install moeedge first")
    records = run_cases(args, formats, tokens_list, threads_list, modes, lib, include, _core)
    print(f"ratio = ggml time / moeedge time (> 1: moeedge faster), of medians of {args.reps * args.rounds} "
          "calls each; r(min) the same of the fastest calls; GB/s of stored weight bytes (1e9).\n"
          "diff = max|ggml - moeedge| / max|moeedge|; err = max|engine - float64 reference| / max|reference|.")
    if args.json:
        meta = {"rows": args.rows, "cols": args.cols, "reps": args.reps, "rounds": args.rounds, "tol": args.tol,
                "lib": str(lib), "include": str(include), "moeedge_path": _core.linear_path(), "prompt_kernels": args.prompt,
                "cpu_features": _core.cpu_features(), "machine": platform.node(), "cpus": os.cpu_count(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    if bad := [r for r in records if not r["agree"]]:
        print(f"{len(bad)} case(s) disagree beyond --tol {args.tol}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
