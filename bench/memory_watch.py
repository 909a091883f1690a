"""A prompt and a few tokens under a real cgroup limit, with the process's resident memory
and the expert cache's sampled every 2 s: how close a run comes to its limit, and what
holds the bytes (the full-size prefill OOM in bench/README.md).

    python bench/memory_watch.py /var/tmp/moeedge-models/mixtral-8x7b-q4_k_m.gguf --limit 16GiB --prompt-tokens 512

Prints one JSON line per sample and a last one with the exit code, the cgroup's peak and its
OOM kills; the closest sample is the largest RssAnon + RssFile against the limit.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time


def rss_mib() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) >> 10 for k, v in (line.split(":", 1) for line in f)
                if k in ("RssAnon", "RssFile", "VmPTE")}


def cgroup_mib() -> dict:
    """What this process's memory cgroup is charged: in all, by the kernel (v1's kmem: page
    tables, slab), and as page cache."""
    from moeedge.runtime.measure import memory_cgroup

    found = memory_cgroup()
    if found is None:
        return {}
    d, version = found
    names = {"cg_usage": "memory.current", "cg_kmem": None} if version == 2 else \
        {"cg_usage": "memory.usage_in_bytes", "cg_kmem": "memory.kmem.usage_in_bytes"}
    out = {}
    for key, name in names.items():
        try:
            out[key + "_mib"] = int((d / name).read_text()) >> 20 if name else None
        except (OSError, ValueError):
            out[key + "_mib"] = None
    try:
        stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
        out["cg_cache_mib"] = int(stat.get("cache", stat.get("file", 0))) >> 20
    except (OSError, ValueError):
        pass
    return out


def child(source: str, budget: int, prompt_tokens: int, tokens: int) -> None:
    import moeedge
    from moeedge.decode_measures import prompt_ids

    model = moeedge.load(source, memory_budget=budget, max_context=prompt_tokens + tokens, threads=2)
    start = time.time()

    def sample():
        while True:
            s = model.cache.stats()
            print(json.dumps({"s": round(time.time() - start, 1), **rss_mib(), **cgroup_mib(), "cache_mib": s["resident_bytes"] >> 20,
                              "cache_budget_mib": s["budget_bytes"] >> 20}), flush=True)
            time.sleep(2)

    threading.Thread(target=sample, daemon=True).start()
    for _ in model.stream_ids(prompt_ids(model.config.vocab, prompt_tokens), max_new_tokens=tokens, temperature=0):
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--limit", required=True, help="the cgroup's limit and the budget (e.g. 16GiB)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from moeedge.units import parse_bytes

    limit = parse_bytes(args.limit)
    if args.child:
        child(args.source, limit, args.prompt_tokens, args.tokens)
        return 0
    from moeedge.cgroup import run_limited

    cmd = [sys.executable, __file__, args.source, "--limit", str(limit), "--prompt-tokens", str(args.prompt_tokens),
           "--tokens", str(args.tokens), "--child"]
    result = run_limited(cmd, limit, timeout=3600)
    samples = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for s in samples:
        print(json.dumps(s))
    closest = max(samples, key=lambda s: s["RssAnon"] + s["RssFile"], default=None)
    print(json.dumps({"returncode": result.returncode, "limit_mib": limit >> 20, "peak_mib": result.peak_bytes >> 20,
                      "oom_kills": result.oom_kills, "closest": closest}))
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
