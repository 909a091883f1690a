"""A peer that drops out mid-decode (killed, or stalled with SIGSTOP), on loopback:

    .venv/bin/python bench/peers_fault.py [--model DIR] [--deadline 1.0] [--at 6]

Decodes with a peer (the client's cache holds --skip experts, the peer the next most used
that fit its budget), makes it fail after --at tokens, and reports each token's latency: the
worst token's must be at most the deadline plus the local reads of the experts the peer held
for that token; the tokens must equal a run without the peer. Writes
bench/results/peers_fault.json."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import moeedge

HERE = Path(__file__).resolve().parent
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("


def start_peer(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "moeedge.cli", "serve-experts", args.model, "--memory-budget", args.peer_budget,
           "--trace", args.trace, "--skip-most-used", str(args.skip)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("/ip4/"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(300)
    address = next((x for x in lines if x.startswith("/ip4/")), None)
    if address is None:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"peer did not start: {lines}")
    print("\n".join(lines), flush=True)
    return proc, address


def decode(args, peer=None, fail=None) -> dict:
    model = moeedge.load(args.model, memory_budget="4GiB", peers=[peer[1]] if peer else None,
                         peer_deadline=args.deadline)
    # the client's cache as under L (a quarter of the experts), in one process for all three runs
    store = model.cache.store
    model.cache.set_budget(args.skip * store.slot_bytes(store.keys()[0]))
    ids = model.tokenizer.encode(PROMPT)
    tokens, latencies, last = [], [], None
    for token in model.stream_ids(ids, max_new_tokens=args.tokens + 1, temperature=0):
        now = time.perf_counter()
        if last is not None:
            tokens.append(token)
            latencies.append(now - last)
        if fail and len(tokens) == args.at:
            os.killpg(peer[0].pid, fail)
        last = time.perf_counter()
    stats = model.stats()
    model.close()
    return {"tokens": tokens, "latencies_s": latencies, "peers": stats.get("peers"),
            "read_s_per_expert": stats["read_seconds"] / max(1, stats["reads"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/var/tmp/moeedge-models/default-64m")
    p.add_argument("--trace", default=str(HERE / "traces" / "default-heldout.npz"))
    p.add_argument("--peer-budget", default="808MiB")
    p.add_argument("--skip", type=int, default=8, help="experts the client caches; the peer holds the next")
    p.add_argument("--deadline", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--at", type=int, default=6, help="tokens decoded before the peer fails")
    args = p.parse_args()
    results = {"alone": decode(args)}
    for name, sig in (("killed", signal.SIGKILL), ("stalled", signal.SIGSTOP)):
        peer = start_peer(args)
        try:
            run = decode(args, peer, sig)
        finally:
            os.killpg(peer[0].pid, signal.SIGKILL)
            peer[0].wait(30)
        worst = max(range(len(run["latencies_s"])), key=run["latencies_s"].__getitem__)
        run["tokens_equal"] = run["tokens"] == results["alone"]["tokens"]
        run["worst_token"] = worst
        results[name] = run
        typical = sorted(run["latencies_s"])[len(run["latencies_s"]) // 2]
        print(f"{name}: tokens equal {run['tokens_equal']}, worst token #{worst} {run['latencies_s'][worst]:.3f} s "
              f"(median {typical:.3f} s, deadline {args.deadline} s, a read {run['read_s_per_expert']:.3f} s), "
              f"failures after: {run['peers']['computed_here_after_failure']}", flush=True)
    out = HERE / "results" / "peers_fault.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
