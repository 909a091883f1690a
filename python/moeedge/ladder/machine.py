"""What a plan's cost depends on, measured on this machine and cached: the expert
cache's cold read bandwidth (moeedge.iobench, O_DIRECT as the runtime reads), and the
seconds the native expert FFN (moeedge._core.ExpertFfn) takes for one expert of the
model's shape in each format, for one token (decode) and per token of a prefill chunk.

The cache is $XDG_CACHE_HOME/moeedge/machine.json, keyed by the CPU model, the kernel
path, the kernel threads and the shape; remeasure=True refreshes an entry.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from moeedge._core import kernel_threads, linear_path
from moeedge.formats.checkpoint import ExpertPart
from moeedge.formats.group_quant import quant_name, quantize
from moeedge.harness.machine import cpu
from moeedge.runtime.experts import native_ffn

FORMATS = {"stored": None, "int8": 8, "int4": 4}
PREFILL_TOKENS = 64
REPEATS = 31
IO_FILE_BYTES = 64 << 20


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeedge" / "machine.json"


def cached(key: str, measure, remeasure: bool):
    path = cache_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if remeasure or key not in table:
        table[key] = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        os.replace(tmp, path)
    return table[key]


def machine_key() -> str:
    return f"{cpu()['model']}|{linear_path()}|threads={kernel_threads()}"


def synthetic_expert(hidden: int, inter: int, bits: int | None, group: int = 64) -> tuple[torch.Tensor, list]:
    """(packed bytes, parts) of one random expert in a format, as a checkpoint lays it."""
    gen = torch.Generator().manual_seed(0)
    blobs, parts, offset = [], [], 0
    for role, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        w = torch.randn(shape, generator=gen) * 0.02
        if bits is None:
            raw = w.to(torch.bfloat16).view(torch.uint8).reshape(-1)
            parts.append(ExpertPart(role, torch.bfloat16, shape, offset, raw.numel()))
        else:
            q, s = quantize(w, bits, group)
            raw = torch.cat([q.view(torch.uint8).reshape(-1), s.view(torch.uint8).reshape(-1)])
            parts.append(ExpertPart(role, torch.uint8, shape, offset, raw.numel(), quant_name(bits, group)))
        blobs.append(raw)
        offset += raw.numel()
    return torch.cat(blobs).contiguous(), parts


def ffn_seconds(hidden: int, inter: int, bits: int | None, tokens: int) -> float:
    """Median seconds of one expert's FFN over `tokens` tokens."""
    expert, parts = synthetic_expert(hidden, inter, bits)
    ffn = native_ffn(parts)
    x = torch.randn(tokens, hidden)
    out = torch.empty(tokens, hidden)
    raw = expert.numpy()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        ffn(x.numpy(), raw, out.numpy())
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def compute_costs(hidden: int, inter: int, remeasure: bool = False) -> dict:
    """{format: {"decode_s": one expert for one token, "prefill_s": per token of a chunk}}."""
    def measure():
        return {name: {"decode_s": ffn_seconds(hidden, inter, bits, 1),
                       "prefill_s": ffn_seconds(hidden, inter, bits, PREFILL_TOKENS) / PREFILL_TOKENS}
                for name, bits in FORMATS.items()}
    return cached(f"{machine_key()}|ffn {hidden}x{inter}", measure, remeasure)


def read_bandwidth(directory: Path, expert_bytes: int, remeasure: bool = False) -> float:
    """Bytes/s the expert cache reads experts of this size cold from directory's disk."""
    from moeedge.iobench import measure_io

    def measure():
        report = measure_io(directory, max(IO_FILE_BYTES, 16 * expert_bytes), expert_bytes)
        return report.cache_direct_gbps * 1e9
    return cached(f"{machine_key()}|read {os.stat(directory).st_dev}|{expert_bytes}", measure, remeasure)


def decode_step_seconds(source, identity: str, remeasure: bool = False, steps: int = 32) -> float:
    """Median seconds of one decode step of the source with every expert resident (the
    experts read once first): what the planner subtracts its expert compute from."""
    def measure():
        import moeedge

        with moeedge.load(source, max_context=256) as model:
            seq, ids = model.sequence, list(range(3, 3 + 16))
            with torch.inference_mode():
                model.runner.prompt(seq, ids, model.plan.prefill_chunk)
                times, token = [], torch.tensor([5])
                for _ in range(steps + 4):  # the first steps read what the prompt did not route to
                    start = time.perf_counter()
                    model.runner.step([(seq, token)])
                    times.append(time.perf_counter() - start)
        return statistics.median(times[4:])
    return cached(f"{machine_key()}|decode step {identity}", measure, remeasure)


def load_fixed_bytes(remeasure: bool = False) -> int:
    """What moeedge.load measures as the fixed cost in a fresh process that imported only
    moeedge (as `moeedge run` does): the planner splits the budget of the process that
    will run the plan, not of the one planning it (which imports more)."""
    import subprocess
    import sys

    def measure():
        code = "import moeedge.api; from moeedge.runtime.measure import rss_bytes; print(rss_bytes())"
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    return cached(f"{machine_key()}|load fixed bytes", measure, remeasure)


def miss_wait_seconds(source, identity: str, remeasure: bool = False, tokens: int = 32) -> float:
    """What a miss costs a decode step here, from the runtime's own counters: the cache's
    wait seconds per miss while decoding with room for half the experts. On a busy machine
    it is far more than bytes / bandwidth (the reader thread's wake-up, other processes'
    IO), so the cost model takes it as a per-read latency on top of the bytes."""
    def measure():
        import moeedge

        with moeedge.load(source, max_context=256, memory_budget="2GiB") as model:
            slot = model.runner.experts.slot
            every = len(model.cache.store.keys())
            model.cache.set_budget(max(model.config.top_k, every // 2) * slot)
            ids = list(range(3, 3 + 16))
            list(model.stream_ids(ids, max_new_tokens=2, temperature=0))
            model.cache.reset_stats()
            list(model.stream_ids(ids, max_new_tokens=tokens, temperature=0))
            stats = model.cache.stats()
        return stats["wait_seconds"] / max(1, stats["misses"])
    return cached(f"{machine_key()}|miss wait {identity}", measure, remeasure)
