"""A real walking trace replayed on the link between two emulated devices while one decodes
with the other's experts (root only):

    sudo .venv/bin/python bench/peers_trace.py [--model DIR] [--network walking-trace.csv:throughput_mbps]
        [--scale 0.002] [--start 150] [--seconds 300] [--rtt VERIZON:US-East] [--rtt-scale 1]
        [--alone-seconds 60] [--out peers_trace]

Devices as in peers_decode.py: A (core 0, a memory cgroup of L) decodes greedily; B (core 1,
its own cgroup of L) runs `moeedge serve-experts` with the experts A cannot cache. The link
between their namespaces is tc tbf; each second of the trace (5Gophers, ../shared/data/
network/) sets its rate (the trace's throughput times --scale, at least RATE_FLOOR_MBIT)
and the round trip that a relay beside the peer adds in user space (bench/peers_delay.py:
no netem here), from round-trip-times.csv's samples of one carrier and server in file order.
A prints one JSON line per token (its time, what its missing experts did: sent to the peer or
read here, and its own measurements of the link); A alone runs --alone-seconds before and
after, for its tokens/s and tokens. Writes bench/results/OUT.json, then peers_trace_report.py's
table and plot."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "network" / "5gophers"
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("
RATE_FLOOR_MBIT = 0.01  # a second of no throughput (an outage) is this slow a link: tbf needs a rate
# tbf's bucket at slow rates (10 ms worth above 3.3 Mbit/s): two full packets, so that a call
# of a few KB is held to the rate as on a slow radio link, not let through in a 32 KiB burst
BURST_BYTES = 4 << 10


def load_trace(spec: str, scale: float, start: int, seconds: float, rtt: str,
               rtt_scale: float = 1.0) -> list[tuple[float, float]]:
    """[(link Mbit/s, round trip ms)] one a second: FILE:COLUMN's throughput times scale, and
    CARRIER:LOCATION's round trips in file order (repeated if shorter) times rtt_scale."""
    name, _, column = spec.partition(":")
    with open(DATA / name, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise ValueError(f"{name} has no column {column!r} (it has {list(rows[0]) if rows else 'no rows'})")
    rates = [max(RATE_FLOOR_MBIT, float(r[column] or 0) * scale) for r in rows][start:start + int(seconds)]
    carrier, _, location = rtt.partition(":")
    with open(DATA / "round-trip-times.csv", newline="") as f:
        rtts = [float(r["rtt_ms"]) for r in csv.DictReader(f) if (r["carrier"], r["server_location"]) == (carrier, location)]
    if not rates or not rtts:
        raise ValueError(f"nothing to replay: {len(rates)} seconds of {spec} from {start}, {len(rtts)} round trips "
                         f"of {rtt}")
    return [(rate, rtts[i % len(rtts)] * rtt_scale) for i, rate in enumerate(rates)]


def link_record(remote) -> dict:
    link = remote.client.links[0]
    return {"alive": link.alive, "rtt_s": link.cost.rtt_s, "bandwidth_bps": link.cost.bandwidth_bps,
            "service_s": link.cost.service_s, "disk_bps": remote.disk_bps, "local_s": remote.local.seconds(1)}


def client(args: argparse.Namespace) -> None:
    """Inside device A: decode for --seconds (a new sequence when the context is full), one
    JSON line a token."""
    import moeedge

    model = moeedge.load(args.model, memory_budget=args.budget, peers=[args.peer] if args.peer else None,
                         peer_deadline=args.deadline, threads=1)
    remote = getattr(model.runner, "remote", None)
    if remote is not None:
        remote.client.bandwidth_refresh_s = args.bandwidth_refresh
    ids = model.tokenizer.encode(PROMPT)
    room = model.runner.max_context - len(ids) - 1
    print(json.dumps({"ready": time.time()}), flush=True)
    end = time.monotonic() + args.seconds
    sequence = 0
    while time.monotonic() < end:
        last, seen = time.perf_counter(), dict(remote.counters) if remote else {}
        for n, token in enumerate(model.stream_ids(ids, max_new_tokens=room, temperature=0)):
            now = time.perf_counter()
            record = {"t": time.time(), "s": now - last, "token": token, "sequence": sequence, "first": n == 0}
            if remote is not None:
                counts = dict(remote.counters)
                record.update({k: counts[k] - seen[k] for k in counts}, link=link_record(remote))
                seen = counts
            print(json.dumps(record), flush=True)
            last = now
            if time.monotonic() >= end:
                break
        sequence += 1
    stats = model.stats()
    print(json.dumps({"done": True, "stats": {k: stats[k] for k in ("hit_rate", "bytes_read", "reads")},
                      "peers": stats.get("peers")}), flush=True)
    model.close()


def run_client(dev, ns: str, args, peer: str | None, seconds: float, on_ready=None) -> dict:
    """One client run in device dev: its records, and on_ready() called when it decodes."""
    from peers_decode import drop_caches

    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--model", args.model, "--budget",
           str(args.budget), "--seconds", str(seconds), "--deadline", str(args.deadline), "--bandwidth-refresh",
           str(args.bandwidth_refresh)]
    if peer:
        cmd += ["--peer", peer]
    drop_caches()
    proc = subprocess.Popen(dev.command(ns, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    tokens, done = [], None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "ready" in record:
            if on_ready is not None:
                on_ready()
        elif record.get("done"):
            done = record
        else:
            tokens.append(record)
    if proc.wait(120) != 0 or done is None:
        raise RuntimeError(f"client exit {proc.returncode}: {''.join(err)[-3000:]}")
    return {"tokens": tokens, "end": done}


class Replay:
    """The trace applied to the link and the relay, a second (1 / speed) at a time."""

    def __init__(self, link, relay: subprocess.Popen, schedule: list[tuple[float, float]], step_s: float):
        self.link, self.relay, self.schedule, self.step_s = link, relay, schedule, step_s
        self.changes: list[dict] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def apply(self, rate: float, rtt: float) -> None:
        self.link.shape(rate)
        self.relay.stdin.write(f"{rtt}\n")
        self.relay.stdin.flush()
        self.changes.append({"t": time.time(), "rate_mbit": rate, "rtt_ms": rtt})

    def run(self) -> None:
        start = time.monotonic()
        for i, (rate, rtt) in enumerate(self.schedule):
            time.sleep(max(0.0, start + i * self.step_s - time.monotonic()))
            self.apply(rate, rtt)


def bench(args: argparse.Namespace) -> None:
    from peers_decode import budget_l, client_experts, expert_bytes, start_peer, tear_down, write_results
    from peers_net import Device, Link, is_root
    from peers_trace_report import report

    if not is_root():
        sys.exit("bench/peers_trace.py needs root (network namespaces, cgroups)")
    schedule = load_trace(args.network, args.scale, args.start, args.seconds, args.rtt, args.rtt_scale)
    args.budget = args.budget or budget_l(args.model)
    args.skip = client_experts(args.model, args.budget)
    from moeedge.formats.open import open_checkpoint

    cfg = open_checkpoint(args.model).config
    link, a, b = Link(schedule[0][0], min_burst=BURST_BYTES), Device(0, args.budget), Device(1, args.budget)
    peer = relay = None
    results = {"model": args.model, "budget_bytes": args.budget, "network": args.network, "scale": args.scale,
               "start": args.start, "rtt": args.rtt, "rtt_scale": args.rtt_scale, "speed": args.speed, "schedule": schedule,
               "hidden": cfg.hidden, "expert_bytes": expert_bytes(args.model)}
    try:
        # the peer on loopback in its namespace: the relay (and so the shaped link) is the one way in
        peer, lines = start_peer(b, link.ns[1], args, "/ip4/127.0.0.1/tcp/4411")
        peer_id = next(x for x in lines if x.startswith("/ip4/")).rsplit("/p2p/", 1)[1]
        results["peer"] = lines[:-1]
        relay = subprocess.Popen(["ip", "netns", "exec", link.ns[1], sys.executable, str(HERE / "peers_delay.py"),
                                  "--listen", f"{link.addr[1]}:4412", "--to", "127.0.0.1:4411", "--rtt-ms",
                                  str(schedule[0][1])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if relay.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay relay did not start")
        address = f"/ip4/{link.addr[1]}/tcp/4412/p2p/{peer_id}"
        print("\n".join(lines[:-1]), flush=True)
        results["alone_before"] = run_client(a, link.ns[0], args, None, args.alone_seconds)
        replay = Replay(link, relay, schedule, 1 / args.speed)
        results["traced"] = run_client(a, link.ns[0], args, address, len(schedule) / args.speed, replay.thread.start)
        results["changes"] = replay.changes
        results["alone_after"] = run_client(a, link.ns[0], args, None, args.alone_seconds)
        results["peak_bytes"] = {"client": a.peak_bytes(), "peer": b.peak_bytes()}
        results["oom_kills"] = {"client": a.oom_kills(), "peer": b.oom_kills()}
    finally:
        tear_down([relay, peer], link, [a, b])
    write_results(args.out, results)
    report(results, HERE / "results" / "plots" / f"{args.out}.png")


def main() -> None:
    sys.path.insert(0, str(HERE))
    from peers_decode import common_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(p)
    p.add_argument("--network", default="walking-trace.csv:throughput_mbps", help="FILE:COLUMN of 5gophers/")
    p.add_argument("--scale", type=float, default=0.002, help="link Mbit/s per trace Mbit/s")
    p.add_argument("--start", type=int, default=150, help="the trace's first second replayed")
    p.add_argument("--seconds", type=float, default=300, help="trace seconds replayed (the client: seconds to decode)")
    p.add_argument("--speed", type=float, default=1.0, help="trace seconds per second")
    p.add_argument("--rtt", default="VERIZON:US-East", help="CARRIER:LOCATION of round-trip-times.csv")
    p.add_argument("--rtt-scale", type=float, default=1.0, help="times each round trip (a nearer peer: < 1)")
    p.add_argument("--alone-seconds", type=float, default=60.0)
    p.add_argument("--out", default="peers_trace", help="results/OUT.json and results/plots/OUT.png")
    p.add_argument("--bandwidth-refresh", type=float, default=5.0, help="the client's least seconds between probes")
    args = p.parse_args()
    client(args) if args.client else bench(args)


if __name__ == "__main__":
    main()
