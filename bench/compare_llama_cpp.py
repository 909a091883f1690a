"""moeedge and llama.cpp side by side on the same GGUF file, each run in its own memory
cgroup with the same limit (page cache included), cold, the same thread count.

    python bench/compare_llama_cpp.py A.gguf [B.gguf ...] [--limits 4GiB,0.5] [--tokens 32]

A limit is bytes ("800MiB") or a fraction of the file's size ("0.5"). llama.cpp runs
through llama-cpp-python (bench/llama_cpp_decode.py), mmap on, its default; moeedge's
memory budget is the limit itself. One JSON line per run, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moeedge.cgroup import drop_page_cache, evict_files, run_limited
from moeedge.units import parse_bytes

HERE = Path(__file__).parent


def limit_bytes(text: str, file_bytes: int) -> int:
    return int(float(text) * file_bytes) if text.replace(".", "", 1).isdigit() and "." in text else parse_bytes(text)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf", nargs="+")
    parser.add_argument("--limits", default="4GiB,0.5")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    rows = []
    for gguf in args.gguf:
        size = os.path.getsize(gguf)
        for text in args.limits.split(","):
            limit = limit_bytes(text, size)
            for engine in ("moeedge", "llama.cpp"):
                if engine == "moeedge":
                    cmd = [sys.executable, "-m", "moeedge.decode_bench", gguf, "--memory-budget", str(limit),
                           "--tokens", str(args.tokens), "--threads", str(args.threads)]
                else:
                    cmd = [sys.executable, str(HERE / "llama_cpp_decode.py"), gguf, "--tokens", str(args.tokens),
                           "--threads", str(args.threads)]
                evict_files([gguf])
                cold = drop_page_cache()
                run = run_limited(cmd, limit, args.timeout)
                record = {"engine": engine, "model": Path(gguf).name, "limit_bytes": limit, "cold": cold,
                          "returncode": run.returncode, "peak_bytes": run.peak_bytes, "oom_kills": run.oom_kills,
                          "seconds": run.seconds}
                if run.returncode == 0:
                    out = json.loads(run.stdout.strip().splitlines()[-1])
                    record.update({k: out.get(k) for k in ("decode_tok_s", "p50_ms", "p99_ms", "prefill_tok_s")})
                else:
                    record["stderr"] = run.stderr[-400:]
                print(json.dumps(record), flush=True)
                rows.append(record)
    print(f"\n{'model':32} {'limit MiB':>9} {'engine':>10} {'tok/s':>7} {'peak MiB':>9} {'rc':>4}")
    for r in rows:
        print(f"{r['model']:32} {r['limit_bytes'] >> 20:9d} {r['engine']:>10} {r.get('decode_tok_s') or 0:7.2f} "
              f"{r['peak_bytes'] >> 20:9d} {r['returncode']:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
