"""Decode under a real memory limit: moeedge on a checkpoint, each budget enforced by a
child memory cgroup of that size (page cache included), prefetch off and on.

    python bench/decode_limited.py /var/tmp/moeedge-models/mixtral-medium [--tokens 32]

Budgets: above the model's size, and fixed cost + dense + a quarter of the expert
bytes (the issue's two points). Before each run the model files are evicted and, as
root, the whole page cache is dropped (`cold` in the record), so the libraries' pages
are charged to the run's own cgroup too. Prints one JSON line per run and a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moeedge.cgroup import drop_page_cache, evict_files, run_limited


def info(source: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "moeedge.cli", "info", source, "--json", "--max-context", "1024"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None, help="append JSON records here")
    args = parser.parse_args()
    facts = info(args.source)
    total = facts["fixed_bytes"] + facts["dense_bytes"] + facts["expert_bytes"]
    budgets = {
        "above model size": int(total * 1.3) + (256 << 20),
        "fixed+dense+1/4 experts": facts["min_budget_bytes"] - 2 * facts["expert_bytes"] // (facts["experts"] *
                                   facts["moe_layers"]) + facts["expert_bytes"] // 4,
    }
    rows = []
    for label, budget in budgets.items():
        for prefetch in (False, True):
            evict_files(facts["files"])
            cold = drop_page_cache()
            cmd = [sys.executable, "-m", "moeedge.decode_bench", args.source, "--memory-budget", str(budget),
                   "--tokens", str(args.tokens)] + (["--prefetch"] if prefetch else [])
            run = run_limited(cmd, budget, args.timeout)
            record = {"label": label, "limit_bytes": budget, "prefetch": prefetch, "cold": cold,
                      "returncode": run.returncode,
                      "peak_bytes": run.peak_bytes, "failcnt": run.failcnt, "oom_kills": run.oom_kills}
            if run.returncode == 0:
                result = json.loads(run.stdout)
                record.update({k: result[k] for k in ("decode_tok_s", "p50_ms", "p99_ms", "prefill_tok_s",
                                                      "hit_rate")})
                record["wait_seconds"] = result["stats"]["wait_seconds"]
                record["bytes_read"] = result["stats"]["bytes_read"]
            else:
                record["stderr"] = run.stderr[-500:]
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
            rows.append(record)
    print(f"\n{'budget':28} {'limit MiB':>9} {'prefetch':>8} {'tok/s':>7} {'hit rate':>8} {'peak MiB':>9} {'oom':>4}")
    for r in rows:
        print(f"{r['label']:28} {r['limit_bytes'] >> 20:9d} {str(r['prefetch']):>8} "
              f"{r.get('decode_tok_s', float('nan')):7.2f} {r.get('hit_rate', float('nan')):8.2f} "
              f"{r['peak_bytes'] >> 20:9d} {r['oom_kills']:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
