"""The planner's plans run for real: tokens/s of the lossless plan, the chosen one and
the fastest on the frontier at each budget, each in its own process inside a memory
cgroup limited to the budget, alternating plans, repeated; predicted against measured.

    python bench/controller_plans.py [SOURCE] --ladder DIR --budgets 277MiB,281MiB,285MiB \
        [--max-kl 0.001] [--tokens 64] [--repeats 3] [--json OUT] [--no-limit]

Quality of each plan: the end-to-end KL and top-1 agreement against the source on
held-out text (moeedge.ladder.plan_source.check), once per plan.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from moeedge.cgroup import run_limited
from moeedge.data.corpus import collect
from moeedge.ladder.plan_source import check_variants, plan_source
from moeedge.units import format_bytes, parse_bytes


def plans_at(source, ladder: str, budget: int, max_kl: float, tmp: Path) -> list[tuple[str, dict, dict]]:
    """(label, plan file, predicted) for the lossless, chosen and fastest plans."""
    sp = plan_source(source, budget, max_kl, ladder, max_context=256)
    c = sp.choice
    picked = {"lossless": c.lossless, "chosen": c.chosen, "fastest": c.frontier[-1]}
    out, seen = [], set()
    for label, point in picked.items():
        if point is None or tuple(point.variants) in seen:
            continue
        seen.add(tuple(point.variants))
        body = {**sp.plan_file(), "variants": point.variants, "predicted": point.as_dict()}
        path = tmp / f"{budget}-{label}.json"
        path.write_text(json.dumps(body))
        out.append((label, {"path": str(path), **body}, point.as_dict()))
    return out


def run_once(source, budget: int, plan_path: str, prompt: str, tokens: int, limited: bool = True) -> dict:
    cmd = [sys.executable, "-m", "moeedge.cli", "run", *([str(source)] if source else []),
           "--memory-budget", str(budget), "--plan", plan_path, "--max-context", "256", "--prompt", prompt,
           "--max-new-tokens", str(tokens), "--json"]
    r = run_limited(cmd, budget if limited else None, timeout=600)
    if r.returncode != 0:
        return {"returncode": r.returncode, "oom_kills": r.oom_kills, "peak_bytes": r.peak_bytes,
                "error": r.stderr.strip().splitlines()[-1:]}
    stats = json.loads(r.stdout)["stats"]
    return {"returncode": 0, "decode_tok_s": stats["decode_tok_s"], "hit_rate": stats["hit_rate"],
            "bytes_read": stats["bytes_read"], "peak_bytes": r.peak_bytes, "oom_kills": r.oom_kills}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=None)
    p.add_argument("--ladder", required=True)
    p.add_argument("--budgets", required=True)
    p.add_argument("--max-kl", type=float, default=1e-3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--no-limit", action="store_true",
                   help="run each plan in a cgroup that only measures (the budget still sizes the cache): "
                        "the cost model without the kernel's reclaim near a limit")
    args = p.parse_args()
    texts = collect().texts("heldout")
    prompt = texts[0][:400]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (parse_bytes(b) for b in args.budgets.split(",")):
            plans = plans_at(args.source, args.ladder, budget, args.max_kl, Path(tmp))
            runs = {label: [] for label, _, _ in plans}
            for rep in range(args.repeats):
                order = plans if rep % 2 == 0 else plans[::-1]
                for label, plan, _ in order:
                    runs[label].append(run_once(args.source, budget, plan["path"], prompt, args.tokens,
                                                not args.no_limit))
            for label, plan, predicted in plans:
                ok = [r for r in runs[label] if r["returncode"] == 0]
                q = check_variants(args.source, Path(plan["ladder"]), plan["variants"])
                row = {"budget_bytes": budget, "plan": label, "variants": plan["variants"],
                       "predicted_tok_s": predicted["tok_s"], "predicted_hit_rate": predicted["hit_rate"],
                       "kl_sum_predicted": predicted["kl_sum"], "quality": q, "runs": runs[label],
                       "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in ok) if ok else None,
                       "peak_bytes_max": max(r["peak_bytes"] for r in runs[label]),
                       "oom_kills": sum(r["oom_kills"] for r in runs[label])}
                results.append(row)
                print(f"{format_bytes(budget):>10} {label:<9} {','.join(plan['variants']):<28} predicted "
                      f"{predicted['tok_s']:7.1f} tok/s  measured {row['decode_tok_s_median'] or 0:7.1f}  "
                      f"hit {100 * (statistics.median(r['hit_rate'] for r in ok) if ok else 0):5.1f}%  "
                      f"KL {q['kl_mean']:.2e} top-1 {100 * q['top1_agreement']:.2f}%  peak "
                      f"{format_bytes(row['peak_bytes_max'])}  OOM {row['oom_kills']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
