"""Two emulated devices serving one model together against one device alone (root only).

    sudo .venv/bin/python bench/peers_decode.py [--model DIR] [--rates 100 30 10 3 1] [--repeats 3]
        [--prompt-tokens N] [--out peers_decode]

Device A (core 0, a memory cgroup of L) decodes; device B (core 1, another cgroup of L)
runs `moeedge serve-experts` with --experts auto ordered by a routing trace, reachable over a
veth pair shaped to each rate (tbf). L = the model's smallest budget less one layer's top-k
experts plus a quarter of its expert bytes: the fixed cost, dense weights, KV, buffers and a
quarter of the experts. Runs alternate (alone, with the peer), the medians are compared, and
the tokens of both must be equal. --prompt-tokens N: a prompt of N tokens (the text repeated),
its prefill (to the first token) timed too: with the peer, pipelined across it. Writes
bench/results/OUT.json."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("


def client(args: argparse.Namespace) -> None:
    """One decode, run inside device A: prints one JSON line."""
    import moeedge

    model = moeedge.load(args.model, memory_budget=args.budget, peers=[args.peer] if args.peer else None,
                         peer_deadline=args.deadline, threads=1)
    ids = model.tokenizer.encode(PROMPT)
    ids = (ids * (args.prompt_tokens // len(ids) + 1))[:args.prompt_tokens] if args.prompt_tokens else ids
    tokens, start, asked = [], None, time.perf_counter()
    for token in model.stream_ids(ids, max_new_tokens=args.tokens + 1, temperature=0):
        if start is None:  # the first token closes the prompt's prefill: decode timed from there
            start = time.perf_counter()
        tokens.append(token)
    seconds = time.perf_counter() - start
    stats = model.stats()
    print(json.dumps({"tokens": tokens[1:], "first": tokens[0], "tok_s": (len(tokens) - 1) / seconds,
                      "prefill_s": start - asked, "prompt_tokens": len(ids), "hit_rate": stats["hit_rate"],
                      "bytes_read": stats["bytes_read"], "peers": stats.get("peers")}))
    model.close()


def expert_bytes(model: str) -> int:
    """One expert's bytes (the mean over the model's experts)."""
    from moeedge.formats.open import open_checkpoint

    ckpt = open_checkpoint(model)
    return ckpt.expert_nbytes // (len(ckpt.config.moe_layers) * ckpt.config.n_experts)


def budget_l(model: str) -> int:
    from moeedge.formats.open import open_checkpoint
    from moeedge.info import describe

    info = json.loads(describe(model, 1024, json_out=True))
    ckpt = open_checkpoint(model)
    return info["min_budget_bytes"] - ckpt.config.top_k * expert_bytes(model) + ckpt.expert_nbytes // 4


def client_experts(model: str, budget: int) -> int:
    """Experts the client caches under budget: the peer holds the next most used."""
    from moeedge.formats.open import open_checkpoint

    return (budget - budget_l(model) + open_checkpoint(model).expert_nbytes // 4) // expert_bytes(model)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run_client(dev, ns: str, args, peer: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--model", args.model, "--budget",
           str(args.budget), "--tokens", str(args.tokens), "--deadline", str(args.deadline), "--prompt-tokens",
           str(args.prompt_tokens)]
    if peer:
        cmd += ["--peer", peer]
    drop_caches()
    run = subprocess.run(dev.command(ns, cmd), capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"client exit {run.returncode}: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def start_peer(dev, ns: str, args, listen: str) -> tuple[subprocess.Popen, list[str]]:
    """serve-experts in device dev, namespace ns, on multiaddr listen (any caller allowed off
    loopback: the namespaces' link reaches nothing else)."""
    cmd = [sys.executable, "-m", "moeedge.cli", "serve-experts", args.model, "--memory-budget", str(args.budget),
           "--listen", listen, "--trace", args.trace, "--skip-most-used", str(args.skip)]
    if not listen.startswith("/ip4/127."):
        cmd.append("--allow-any")
    proc = subprocess.Popen(dev.command(ns, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("/ip4/"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or not any(x.startswith("/ip4/") for x in lines):
        proc.kill()
        raise RuntimeError(f"peer did not start: {lines} {proc.stderr.read()[-3000:]}")
    return proc, lines


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from peers_net import Device, Link, is_root

    if not is_root():
        sys.exit("bench/peers_decode.py needs root (network namespaces, cgroups)")
    args.budget = args.budget or budget_l(args.model)
    args.skip = client_experts(args.model, args.budget)
    link, a, b, peer = Link(args.rates[0]), Device(0, args.budget), Device(1, args.budget), None
    results = {"model": args.model, "budget_bytes": args.budget, "tokens": args.tokens,
               "prompt_tokens": args.prompt_tokens, "rates": []}
    try:
        peer, lines = start_peer(b, link.ns[1], args, f"/ip4/{link.addr[1]}/tcp/4411")
        address = next(x for x in lines if x.startswith(f"/ip4/{link.addr[1]}/"))
        results["peer"] = lines[:-1]
        print("\n".join(lines), flush=True)
        for rate in args.rates:
            link.shape(rate)
            alone, together = [], []
            for _ in range(args.repeats):
                alone.append(run_client(a, link.ns[0], args, None))
                together.append(run_client(a, link.ns[0], args, address))
            same = all(r["tokens"] == alone[0]["tokens"] and r["first"] == alone[0]["first"] for r in alone + together)
            row = {"rate_mbit": rate, "alone_tok_s": statistics.median(r["tok_s"] for r in alone),
                   "peer_tok_s": statistics.median(r["tok_s"] for r in together), "tokens_equal": same,
                   "alone_prefill_s": statistics.median(r["prefill_s"] for r in alone),
                   "peer_prefill_s": statistics.median(r["prefill_s"] for r in together),
                   "sent": together[-1]["peers"]["sent"], "read_here": together[-1]["peers"]["read_here"],
                   "link": together[-1]["peers"]["peers"][0], "runs": {"alone": alone, "peer": together}}
            row["speedup"] = row["peer_tok_s"] / row["alone_tok_s"]
            results["rates"].append(row)
            print(f"{rate:>7} Mbit/s  alone {row['alone_tok_s']:.2f} tok/s  with peer {row['peer_tok_s']:.2f} tok/s  "
                  f"x{row['speedup']:.2f}  prefill alone {row['alone_prefill_s']:.2f} s with peer "
                  f"{row['peer_prefill_s']:.2f} s  sent {row['sent']} read here {row['read_here']}  tokens equal {same}",
                  flush=True)
        results["peak_bytes"] = {"client": a.peak_bytes(), "peer": b.peak_bytes()}
        results["oom_kills"] = {"client": a.oom_kills(), "peer": b.oom_kills()}
    finally:
        tear_down([peer], link, [a, b])
    write_results(args.out, results)


def tear_down(procs: list, link, devices: list) -> None:
    for proc in procs:
        if proc is not None:
            stop(proc)
    link.close()
    time.sleep(1)  # the devices' last processes exit
    for device in devices:
        device.close()


def write_results(name: str, results: dict) -> Path:
    out = HERE / "results" / f"{name}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}")
    return out


def common_args(p: argparse.ArgumentParser) -> None:
    """The arguments the two-device benchmarks share (this one and peers_trace.py)."""
    p.add_argument("--model", default="/var/tmp/moeedge-models/default-64m")
    p.add_argument("--trace", default=str(HERE / "traces" / "default-heldout.npz"), help="the routing trace")
    p.add_argument("--budget", type=int, default=None, help="L in bytes (default: as peers_decode.py says)")
    p.add_argument("--deadline", type=float, default=1.0)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer", default=None, help=argparse.SUPPRESS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(p)
    p.add_argument("--rates", type=float, nargs="+", default=[100, 30, 10, 3, 1], help="link Mbit/s, in order")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=0, help="a prompt this long (the text repeated): prefill timed")
    p.add_argument("--out", default="peers_decode", help="results/OUT.json")
    args = p.parse_args()
    client(args) if args.client else bench(args)


if __name__ == "__main__":
    main()
