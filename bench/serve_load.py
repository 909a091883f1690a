"""Load generator for `moeedge serve`: N concurrent streaming clients, side by side for
several N, alternating, medians over rounds.

    python bench/serve_load.py /var/tmp/moeedge-models/default-64m --streams 1,2,4,8 --tokens 64 --rounds 3
    python bench/serve_load.py /var/tmp/moeedge-models/default-64m --memory-budget 1073MB --cgroup --policy lru
    python bench/serve_load.py /var/tmp/moeedge-models/default-64m --streams 1 --baseline --rounds 5

It starts the server itself (optionally inside a memory cgroup limited to the budget), on
a free loopback port with --max-batch the largest N, and for each round and each N (in
alternating order) sends N requests at once, each a different held-out source file's
opening (the default model's corpus), greedy, ignore_eos, --tokens tokens. Per N it
reports: aggregate tokens/s (all tokens over the round's wall time, from the first
request sent to the last token), the server's decode tokens/s (its counters: generated
tokens over time in decode steps), p50/p99 time to first token, p99 time between tokens
(gaps between a stream's chunks), expert bytes read per generated token, and experts used
per generated token, resident or read (cache gets; /metrics).
--baseline also times `moeedge run`'s decode loop (the library, loaded and warm in a
process of its own) on the same prompt, alternating with a one-stream request, and
reports the server's decode time per token over run's (both stop at end of sequence).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import urllib.request

from serve_clients import (ServerProcess, commit, cpu_name, free_port, held_out_prompts, report, run_clients,
                           stream_once, summarize)


# -- the server ------------------------------------------------------------------------
class Server(ServerProcess):
    """`moeedge serve` with --max-batch the largest N, in a cgroup limited to the budget with --cgroup."""

    def __init__(self, args, max_batch: int):
        from moeedge.units import parse_bytes

        port = free_port()
        cmd = [sys.executable, "-m", "moeedge.cli", "serve", args.source, "--port", str(port),
               "--max-batch", str(max_batch), "--max-context", str(args.max_context),
               "--memory-budget", args.memory_budget, "--policy", args.policy]
        super().__init__(cmd, port, args.log, parse_bytes(args.memory_budget) if args.cgroup else None, start_s=600)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}


def one_round(server: Server, prompts: list[str], tokens: int) -> dict:
    """The clients' figures, and from /metrics the server's decode rate and what it read."""
    before = server.metrics()
    row = run_clients(server.port, prompts, tokens)
    after = server.metrics()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    generated = row["generated"]
    return {**row,
            "server_decode_tok_s": delta["moeedge_generated_tokens_total"] / delta["moeedge_decode_seconds_total"],
            "bytes_read_per_token": delta["moeedge_bytes_read_total"] / generated,
            # experts the steps used (cache gets), resident or read: the weights a token costs
            "experts_per_token": (delta["moeedge_cache_hits_total"] + delta["moeedge_cache_misses_total"]) / generated,
            "decode_steps": delta["moeedge_decode_steps_total"]}


def summarize_moeedge(rounds: list[dict]) -> dict:
    med = statistics.median
    return {**summarize(rounds), "server_decode_tok_s": med(r["server_decode_tok_s"] for r in rounds),
            "bytes_read_per_token": med(r["bytes_read_per_token"] for r in rounds),
            "experts_per_token": med(r["experts_per_token"] for r in rounds)}


# -- against `moeedge run` -------------------------------------------------------------
class RunWorker:
    """`moeedge run`'s decode loop (MoeModel.stream, the library the command calls) in a
    process of its own that stays loaded and warm, timed on request: a fresh `moeedge run`
    would time its first reads of the experts too."""

    def __init__(self, args):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", args.source, "--max-context",
                                      str(args.max_context), "--memory-budget", args.memory_budget,
                                      "--policy", args.policy, "--tokens", str(args.tokens)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def decode_s_per_token(self, prompt: str) -> float:
        self.proc.stdin.write(json.dumps(prompt) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def worker(args) -> int:
    from moeedge.api import load

    with load(args.source, memory_budget=args.memory_budget, max_context=args.max_context,
              policy=args.policy) as model:
        model.generate("def main():", max_new_tokens=args.tokens, temperature=0)   # warm
        for line in sys.stdin:
            before = model.stats()
            model.generate(json.loads(line), max_new_tokens=args.tokens, temperature=0)
            after = model.stats()
            per_token = (after["decode_seconds"] - before["decode_seconds"]) / \
                (after["generated_tokens"] - before["generated_tokens"])
            print(json.dumps(per_token), flush=True)
    return 0


def server_decode_s_per_token(server: Server, prompt: str, tokens: int) -> float:
    """One stream, as run decodes it (stopping at end of sequence): the mean time between
    its tokens, from the first to the last."""
    out: dict = {}
    stream_once(server.port, prompt, tokens, out, ignore_eos=False)
    c = out["chunks"]
    return (c[-1] - c[0]) / (len(c) - 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--streams", default="1,2,4,8", help="comma-separated concurrent streams (default 1,2,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="tokens each request generates (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every N, alternating order (default 3)")
    p.add_argument("--prompt-chars", type=int, default=400, help="characters of each held-out prompt (default 400)")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--memory-budget", default="auto")
    p.add_argument("--policy", default="auto")
    p.add_argument("--cgroup", action="store_true", help="run the server in a memory cgroup limited to the budget")
    p.add_argument("--baseline", action="store_true", help="also compare one stream against `moeedge run`")
    p.add_argument("--log", default="/tmp/moeedge-serve-load.log", help="the server's output")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    streams = [int(s) for s in args.streams.split(",")]
    prompts = held_out_prompts(max(streams), args.prompt_chars)
    server = Server(args, max(streams))
    results: dict = {"source": args.source, "memory_budget": args.memory_budget, "policy": args.policy,
                     "tokens": args.tokens, "cpu": cpu_name(), "commit": commit()}
    try:
        one_round(server, prompts, min(8, args.tokens))   # warm: the experts read, the allocator grown
        per_n: dict[int, list] = {n: [] for n in streams}
        for r in range(args.rounds):
            for n in (streams if r % 2 == 0 else streams[::-1]):
                per_n[n].append(one_round(server, prompts[:n], args.tokens))
                print(f"round {r} streams {n}: {per_n[n][-1]['aggregate_tok_s']:.2f} tok/s", file=sys.stderr)
        results["load"] = [summarize_moeedge(per_n[n]) for n in streams]
        base = results["load"][0]["aggregate_tok_s"]
        for row in results["load"]:
            row["x_first"] = row["aggregate_tok_s"] / base
        if args.baseline:
            ours, theirs = [], []
            run = RunWorker(args)
            try:
                for _ in range(args.rounds):
                    theirs.append(run.decode_s_per_token(prompts[0]))
                    ours.append(server_decode_s_per_token(server, prompts[0], args.tokens))
            finally:
                run.close()
            results["baseline"] = {"run_s_per_token": statistics.median(theirs),
                                   "serve_s_per_token": statistics.median(ours),
                                   "serve_over_run": statistics.median(ours) / statistics.median(theirs),
                                   "all_run": theirs, "all_serve": ours}
        results["peak_cgroup_bytes"] = server.peak_bytes()
        results["server_metrics"] = {k: v for k, v in server.metrics().items()
                                     if k.startswith(("moeedge_memory_budget", "moeedge_expert_cache_budget",
                                                      "moeedge_resident_bytes", "moeedge_cache_hit_rate"))}
    finally:
        server.stop()
    return report(results, args.json)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
