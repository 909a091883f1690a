"""Where a cold prompt's time goes, layer by layer: for each MoE layer, when its routing
began and its experts were done, how long the disk read (the cache's busy time) and the
kernels ran in that interval, and how long the disk sat idle. Run cold, under the same
cgroup limit and read throttle as the matrix's prefill cells (bench/README.md).

    python bench/prefill_timeline.py /var/tmp/moeedge-models/mixtral-8x7b-q4_k_m.gguf --limit 8GiB

Prints a table (and with --json, every layer's figures). The child process (--child) is
the measured one; the parent sets up the cgroup and the throttle, as the harness does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path


def child(args) -> None:
    from moeedge._core import kernel_busy_seconds
    from moeedge.api import load
    from moeedge.decode_measures import prompt_ids

    model = load(args.source, memory_budget=args.limit, policy="auto", predictor="auto",
                 max_context=args.prompt_tokens + 8, threads=args.threads)
    runner, cache = model.runner, model.cache
    events = []

    def mark(kind: str, layer: int) -> None:
        s = cache.stats()
        cpu = os.times()
        events.append((kind, layer, time.perf_counter(), s["read_busy_seconds"], s["bytes_read"],
                       kernel_busy_seconds(), s["wait_seconds"], cpu.user, cpu.system))

    inner = runner._ffn

    def timed_ffn(x, layer, logits=None, apart=False):
        mark("ffn", layer)
        out = inner(x, layer, logits, apart)
        mark("done", layer)
        return out
    runner._ffn = timed_ffn
    mark("start", -1)
    for _ in model.stream_ids(prompt_ids(model.config.vocab, args.prompt_tokens), max_new_tokens=1,
                              temperature=0):
        mark("token", -1)
    stats = {k: v for k, v in model.stats().items() if isinstance(v, (int, float, str))}
    print(json.dumps({"events": events, "threads": thread_times(), "stats": stats}))


def thread_times() -> list[tuple[str, float, float]]:
    """(name, user s, system s) of each of this process's threads (/proc/self/task)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out.append((name, int(fields[11]) / tick, int(fields[12]) / tick))
    return sorted(out, key=lambda t: -(t[1] + t[2]))


def span(prev: tuple, begin: tuple, done: tuple) -> list[float]:
    """From the event before (prev) to done, experts computing from begin: attention, experts,
    disk busy and idle, kernels, waits, CPU user and system seconds, and GB read."""
    wall, busy = done[2] - prev[2], done[3] - prev[3]
    return [begin[2] - prev[2], done[2] - begin[2], busy, wall - busy, done[5] - prev[5], done[6] - prev[6],
            done[7] - prev[7], done[8] - prev[8], (done[4] - prev[4]) / 1e9]


def table(events: list) -> str:
    rows = ["| layer | attention s | experts s | disk busy s | disk idle s | kernels s | waited s | CPU user s "
            "| CPU system s | GB read |", "|---|---|---|---|---|---|---|---|---|---|"]
    spans = [(str(begin[1]), span(prev, begin, done))
             for prev, begin, done in zip(events[:-1:2], events[1:-1:2], events[2::2])]
    end, last = events[-1], events[-2]
    spans.append(("head", span(last, end, end)))  # the final norm and the output projection
    spans.append(("all", [sum(column) for column in zip(*(figures for _, figures in spans))]))
    rows += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in figures) + " |" for name, figures in spans]
    rows.append(f"\nprompt: {end[2] - events[0][2]:.2f} s")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/prefill_timeline.py")
    p.add_argument("source")
    p.add_argument("--limit", default="8GiB", help="the cgroup limit and the memory budget")
    p.add_argument("--throttle", default="400MiB", help="the disk's read rate (blkio throttle)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the events and the cache's stats here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from moeedge.units import parse_bytes

    if args.child:
        args.limit = parse_bytes(args.limit)
        child(args)
        return 0
    from moeedge.cgroup import drop_page_cache, evict_files, run_limited
    from moeedge.read_throttle import ReadThrottle, disk_of

    evict_files([args.source])
    drop_page_cache()
    cmd = [sys.executable, __file__, "--child", *(argv if argv is not None else sys.argv[1:])]
    with contextlib.ExitStack() as stack:
        throttle = stack.enter_context(ReadThrottle(disk_of(args.source), parse_bytes(args.throttle)))
        result = run_limited(cmd, parse_bytes(args.limit), 3600, also_join=[throttle.procs])
    if result.returncode != 0:
        print(f"the run failed (exit {result.returncode}, OOM kills {result.oom_kills}): {result.stderr[-800:]}",
              file=sys.stderr)
        return 1
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out.update(peak_bytes=result.peak_bytes, oom_kills=result.oom_kills)
    print(table(out["events"]))
    print("threads (user s, system s): " + ", ".join(f"{n} {u:.1f}/{s:.1f}" for n, u, s in out["threads"][:8]))
    print(f"cgroup peak {result.peak_bytes / 2**30:.2f} GiB, OOM kills {result.oom_kills}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
