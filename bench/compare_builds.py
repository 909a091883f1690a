"""Decode speed of two builds of moeedge side by side: each build's own interpreter (a
virtualenv in its own git worktree) runs `python -m moeedge.decode_bench` on the same
model and budget, the two alternating run by run, so that a noisy machine moves both.
Prints each run, then per build the median tokens/s, and the ratio new / old.

    python bench/compare_builds.py --old /work/wt-parent/.venv/bin/python \\
        --new .venv/bin/python --runs 3 -- SOURCE --memory-budget 832085888 --tokens 48

Everything after `--` goes to moeedge.decode_bench as it is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def decode_tok_s(python: str, bench_args: list[str]) -> float:
    """One run's decode tokens/s: the median token after the first (moeedge.decode_bench)."""
    r = subprocess.run([python, "-m", "moeedge.decode_bench", *bench_args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{python} -m moeedge.decode_bench failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    record = json.loads(r.stdout.strip().splitlines()[-1])
    return float(record["decode_tok_s"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: compare_builds.py --old PYTHON --new PYTHON [--runs N] -- DECODE_BENCH_ARGS")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="bench/compare_builds.py")
    parser.add_argument("--old", required=True, help="the parent build's python")
    parser.add_argument("--new", required=True, help="this build's python")
    parser.add_argument("--runs", type=int, default=3, help="runs of each build, alternating (default 3)")
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    got: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.runs):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")  # neither always goes first
        for build in order:
            tok_s = decode_tok_s(getattr(args, build), bench_args)
            got[build].append(tok_s)
            print(f"run {i + 1} {build}: {tok_s:.3f} tok/s", flush=True)
    old, new = (statistics.median(got[b]) for b in ("old", "new"))
    print(json.dumps({"old_tok_s": got["old"], "new_tok_s": got["new"], "old_median": old, "new_median": new,
                      "ratio": new / old}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
