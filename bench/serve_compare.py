"""moeedge serve against llama.cpp's servers on one GGUF, the same memory limit and the same
concurrent load: llama.cpp's `llama-server` (-np N slots, its continuous batching) and
llama-cpp-python's `llama_cpp.server`.

    python bench/serve_compare.py /var/tmp/moeedge-models/mixtral-medium-q8_0.gguf --streams 1,4,8 \\
        --tokens 32 --rounds 3 --limit none \\
        --llama-server /var/tmp/llama-server-build/bin/llama-server \\
        --llama-cpp-python /var/tmp/llama-server-venv/bin/python --llama-lib /var/tmp/llama-server-build/bin

Each round starts every server in turn (the order alternating from round to round), each in
a memory cgroup of its own limited to --limit (a fraction of the GGUF's size, bytes, or none),
after dropping the GGUF's pages from the page cache (pages charged to an earlier cgroup would
make a limited server look unlimited). A server is warmed (two requests at once), then gets
each N of --streams (alternating order) as N greedy streaming completions sent at once,
--tokens tokens each, not stopping at end of sequence. The prompts are openings of held-out
source files of the default model's corpus, different for every round and N (no server finds
one in a cache) and the same for every server. Per server and N: the median aggregate tokens/s
over rounds, p50/p99 time to first token and p99 time between tokens (client side, all
rounds). Every server gets --threads threads, slots of --max-context tokens, and
max(streams) slots where it has slots (llama_cpp.server has one: it runs requests one at a
time, and is started with --interrupt_requests False, since by default a new request ends the
stream in flight early).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serve_clients import (ServerProcess, commit, cpu_name, free_port, held_out_prompts, report, run_clients,
                           summarize)

SERVERS = ("moeedge", "llama-server", "llama_cpp.server")


def parse_limit(text: str, gguf: Path) -> int | None:
    from moeedge.units import parse_bytes

    if text.strip().lower() == "none":
        return None
    try:
        fraction = float(text)
    except ValueError:
        return parse_bytes(text)
    if not 0 < fraction <= 1:
        raise ValueError(f"--limit {text}: a fraction of the file is from 0 to 1")
    return int(fraction * gguf.stat().st_size)


def command(name: str, args, port: int, slots: int) -> tuple[list[str], str, dict | None]:
    """(command, health path, environment) of one server."""
    gguf, ctx, threads = str(args.gguf), args.max_context, str(args.threads)
    if name == "moeedge":
        budget = str(args.limit_bytes) if args.limit_bytes else "auto"
        return ([sys.executable, "-m", "moeedge.cli", "serve", gguf, "--port", str(port), "--max-batch", str(slots),
                 "--max-context", str(ctx), "--memory-budget", budget, "--threads", threads], "/health", None)
    if name == "llama-server":
        return ([args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                 "-c", str(slots * ctx), "-t", threads, "-tb", threads], "/health", None)
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": args.llama_lib} if args.llama_lib else None
    return ([args.llama_cpp_python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(ctx), "--n_threads", threads, "--n_threads_batch", threads,
             # its default ends a stream in flight with [DONE] when another request comes: queue them instead
             "--interrupt_requests", "False"],
            "/v1/models", env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--streams", default="1,4,8", help="comma-separated concurrent streams (default 1,4,8)")
    p.add_argument("--tokens", type=int, default=32, help="tokens each request generates (default 32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", default="none", help="memory cgroup limit: a fraction of the GGUF (0.5), bytes, "
                                                   "or none (no cgroup; default)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"which of {','.join(SERVERS)} (default all)")
    p.add_argument("--prompt-chars", type=int, default=400)
    p.add_argument("--max-context", type=int, default=512, help="tokens of each slot (default 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-server", default="/var/tmp/llama-server-build/bin/llama-server")
    p.add_argument("--llama-cpp-python", default="/var/tmp/llama-server-venv/bin/python",
                   help="an interpreter with llama-cpp-python[server]")
    p.add_argument("--llama-lib", default=None, help="LLAMA_CPP_LIB_PATH for llama_cpp.server (a libllama built "
                                                     "from the same source), if it has none of its own")
    p.add_argument("--log", default="/tmp/moeedge-serve-compare.log")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    from moeedge.cgroup import evict_files

    streams = [int(s) for s in args.streams.split(",")]
    servers = args.servers.split(",")
    if unknown := set(servers) - set(SERVERS):
        raise SystemExit(f"unknown servers {sorted(unknown)}: choose from {SERVERS}")
    args.limit_bytes = parse_limit(args.limit, args.gguf)
    slots = max(streams)
    # one set for the warm-up, then a fresh set for every round and N, shared by the servers
    pool = held_out_prompts(slots + args.rounds * sum(streams), args.prompt_chars)
    warm, sets = pool[:2], {}
    at = slots
    for r in range(args.rounds):
        for n in streams:
            sets[r, n], at = pool[at:at + n], at + n
    rows: dict[str, dict[int, list]] = {s: {n: [] for n in streams} for s in servers}
    peaks: dict[str, list] = {s: [] for s in servers}
    failures: list[str] = []
    for r in range(args.rounds):
        for name in (servers if r % 2 == 0 else servers[::-1]):
            evict_files([args.gguf])
            port = free_port()
            cmd, health, env = command(name, args, port, slots)
            try:
                server = ServerProcess(cmd, port, args.log, args.limit_bytes, health, env)
            except RuntimeError as e:   # e.g. it refuses the limit: the others go on
                failures.append(f"round {r} {name}: {e}")
                continue
            try:
                run_clients(port, warm, 4)
                for n in (streams if r % 2 == 0 else streams[::-1]):
                    rows[name][n].append(run_clients(port, sets[r, n], args.tokens))
                    print(f"round {r} {name} streams {n}: {rows[name][n][-1]['aggregate_tok_s']:.2f} tok/s",
                          file=sys.stderr)
            except (RuntimeError, OSError) as e:   # killed by the OOM killer mid-round, say
                failures.append(f"round {r} {name}: {type(e).__name__}: {e}")
            finally:
                peaks[name].append({"peak_cgroup_bytes": server.peak_bytes(), "oom_kills": server.oom_kills()})
                server.stop()
    results = {"gguf": str(args.gguf), "gguf_bytes": args.gguf.stat().st_size, "limit_bytes": args.limit_bytes,
               "tokens": args.tokens, "threads": args.threads, "max_context": args.max_context, "cpu": cpu_name(),
               "commit": commit(),
               "failures": failures,
               "servers": {name: {"load": [summarize(rows[name][n]) for n in streams if rows[name][n]],
                                  "memory": peaks[name]} for name in servers}}
    return report(results, args.json)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
