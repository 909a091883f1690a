"""What one expert's feed-forward costs for 1, 2, 4 and 8 rows (sequences) in one call of
the native, batch-invariant kernel (moeedge._core.ExpertFfn): the ceiling on what decoding
N sequences together can save over decoding them one by one, per expert they share.

    python bench/expert_rows.py /var/tmp/moeedge-models/default-64m --rounds 5

Rounds alternate the row counts; each cell is the median of the rounds' means over 5 calls.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from moeedge.api import load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--rows", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    with load(args.source, max_context=256) as model:
        experts = model.runner.experts
        experts.prefetch(0, [0], priority=1)
        ffn, buf = experts.ffn(0, 0), experts.buffer(0, 0)
        if ffn is None:
            sys.exit("this checkpoint's experts do not take the native feed-forward (fp32 activations needed)")
        hidden = model.config.hidden
        times: dict[int, list[float]] = {n: [] for n in rows}
        for r in range(args.rounds):
            for n in (rows if r % 2 == 0 else rows[::-1]):
                x, y = torch.randn(n, hidden), torch.empty(n, hidden)
                start = time.perf_counter()
                for _ in range(5):
                    ffn(x.numpy(), buf, y.numpy(), 1.0)
                times[n].append((time.perf_counter() - start) / 5)
        one = statistics.median(times[rows[0]])
        for n in rows:
            t = statistics.median(times[n])
            print(f"rows {n}: {t * 1e3:.1f} ms a call, {t / one:.2f} x {rows[0]} row(s), "
                  f"{n * one / t:.2f} x the rows done one by one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
