"""One decode measurement in this process, printed as one JSON object: run it under a
memory cgroup (moeedge.cgroup.run_limited) to measure a budget for real.

    python -m moeedge.decode_bench SOURCE --memory-budget B [--prefetch] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def measure(source: str, memory_budget, prefetch: bool, tokens: int, prompt_tokens: int, policy: str,
            threads: int) -> dict:
    from moeedge.api import load

    torch.set_num_threads(threads)
    model = load(source, memory_budget=memory_budget, prefetch=prefetch, policy=policy, max_context=1024)
    prompt = torch.randint(3, model.config.vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    times, last = [], time.perf_counter()
    start = last
    for _ in model.stream_ids(prompt.tolist(), max_new_tokens=tokens):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    steps = times[1:]  # the first includes the prefill
    stats = model.stats()
    model.close()
    return {
        "source": source, "memory_budget": model.plan.budget_bytes, "prefetch": prefetch, "policy": policy,
        "tokens": len(times), "prompt_tokens": prompt_tokens, "threads": threads,
        "decode_tok_s": 1 / statistics.median(steps) if steps else 0.0,
        "p50_ms": 1000 * statistics.median(steps) if steps else 0.0,
        "p99_ms": 1000 * sorted(steps)[min(len(steps) - 1, int(0.99 * len(steps)))] if steps else 0.0,
        "prefill_tok_s": prompt_tokens / times[0] if times else 0.0,
        "wall_s": time.perf_counter() - start,
        "hit_rate": stats["hit_rate"],
        "plan": stats["plan"], "stats": {k: v for k, v in stats.items() if k not in ("plan",)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.decode_bench")
    parser.add_argument("source")
    parser.add_argument("--memory-budget", default="auto")
    parser.add_argument("--prefetch", action="store_true")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    budget = args.memory_budget if args.memory_budget == "auto" else int(args.memory_budget)
    print(json.dumps(measure(args.source, budget, args.prefetch, args.tokens, args.prompt_tokens, args.policy,
                             args.threads), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
