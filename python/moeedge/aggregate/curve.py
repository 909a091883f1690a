"""Quality against memory: each aggregation method at several shares of the expert
bytes, measured on held-out text, written as JSON and a PNG plot.

    python -m moeedge.aggregate.curve [SOURCE] --methods prune,average,merge,lowrank,distill:lowrank
        --levels 1.0,0.75,0.5,0.3,0.2,0.125 [--eval-tokens 4096] -o OUT_DIR

A method "distill:M" is distillation starting from method M (merge or lowrank).

Whole-expert methods stop at one expert per layer (1/E of the bytes); lowrank's rank 0
is that too, its base counted. A level a method cannot reach is recorded as refused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def measure(source, methods: list[str], levels: list[float], eval_tokens: int, work: Path) -> list[dict]:
    from moeedge.aggregate.pipeline import aggregate

    work.mkdir(parents=True, exist_ok=True)
    points = []
    for method in methods:
        for level in levels:
            out = work / f"{method}-{level}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                if level >= 1.0:  # the source itself: nothing dropped, the reference
                    points.append({"method": method, "level": 1.0, "share": 1.0, "ppl_ratio": 1.0,
                                   "top1_agreement": 1.0, "kl_mean": 0.0})
                    continue
                name, _, start = method.partition(":")
                meta = aggregate(source, name, out, expert_memory=level, distill_from=start or None,
                                 eval_tokens=eval_tokens)
            except ValueError as e:
                points.append({"method": method, "level": level, "refused": str(e)})
                print(json.dumps(points[-1]), flush=True)
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)
            q = meta["quality"]
            points.append({"method": method, "level": level,
                           "share": (meta["expert_bytes"] + meta.get("base_bytes", 0)) / meta["expert_bytes_source"],
                           "ppl_ratio": q["ppl_ratio"], "top1_agreement": q["top1_agreement"],
                           "kl_mean": q["kl_mean"]})
            print(json.dumps(points[-1]), flush=True)
    return points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ppl, top1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(p["method"] for p in points):
        done = sorted((p["share"], p["ppl_ratio"], p["top1_agreement"]) for p in points
                      if p["method"] == method and "refused" not in p)
        shares, ratios, agreement = zip(*done)
        ppl.plot(shares, ratios, marker="o", label=method)
        top1.plot(shares, [100 * a for a in agreement], marker="o", label=method)
    for ax, label in ((ppl, "perplexity ratio to the source"), (top1, "top-1 agreement with the source, %")):
        ax.set_xlabel("share of the source's expert bytes (bases included)")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    ppl.set_title("quality against memory, held-out text")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.aggregate.curve")
    parser.add_argument("source", nargs="?", default=None)
    parser.add_argument("--methods", default="prune,average,merge,lowrank")
    parser.add_argument("--levels", default="1.0,0.75,0.5,0.3,0.2,0.125")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [float(v) for v in args.levels.split(",")]
    points = measure(args.source, args.methods.split(","), levels, args.eval_tokens, args.out / "work")
    (args.out / "curve.json").write_text(json.dumps(points, indent=1) + "\n")
    plot(points, args.out / "curve.png")
    shutil.rmtree(args.out / "work", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
