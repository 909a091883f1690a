"""The memory budget is what the whole process may use, the number a user would give
a cgroup limit. Measured: the process's fixed cost (Python, torch, libraries) and
the cgroup's limit. Planned within the rest: dense weights, KV cache, activation
buffers, the expert cache."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from moeedge._core import BudgetError
from moeedge.units import format_bytes, parse_bytes

# torch's allocator, glibc arenas and Python objects made while running: headroom that
# the real-cgroup tests at the smallest budget hold (tests/test_memory_plan.py) and the
# benchmark matrix's runs at each model's minimum confirm (no OOM kill).
SLACK_BYTES = 48 << 20
# The fixed cost differs by a few MiB between processes (what each imported first): the
# minimum a user is told leaves this much room, so it loads in a fresh process too.
FIXED_JITTER_BYTES = 8 << 20


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value != "max" and int(value) < 1 << 60:
            return int(value)
    return None


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_budget(budget: int | str) -> int:
    """'auto': the cgroup limit if one is set, else what this process holds plus 80% of what is available."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        limit = cgroup_limit_bytes()
        return limit if limit is not None else rss_bytes() + int(0.8 * available_bytes())
    return parse_bytes(budget)


@dataclass
class MemoryPlan:
    budget_bytes: int
    fixed_bytes: int          # measured: the process before the model
    dense_bytes: int
    kv_cache_bytes: int
    buffer_bytes: int         # activations of one decode step, logits, slack
    expert_cache_bytes: int
    min_budget_bytes: int     # fixed + dense + KV + one layer's top-k experts + prefill buffers
    prefill_chunk: int = 0    # tokens per prefill step
    # What a prefill step's activations need beyond buffer_bytes: taken from the expert
    # cache while a prompt is read (each chunk reads most experts again anyway), so that
    # decoding keeps those bytes for experts.
    prefill_borrow_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return ", ".join(f"{k.removesuffix('_bytes')} {format_bytes(v) if k.endswith('_bytes') else v}"
                         for k, v in asdict(self).items())


def plan_memory(budget_bytes: int, fixed_bytes: int, dense_bytes: int, kv_cache_bytes: int, buffer_bytes: int,
                min_expert_bytes: int, prefill_chunk: int = 0) -> MemoryPlan:
    """Split the budget; BudgetError with every number when it is below the smallest workable one."""
    committed = fixed_bytes + dense_bytes + kv_cache_bytes + buffer_bytes
    minimum = committed + min_expert_bytes + FIXED_JITTER_BYTES
    if budget_bytes < committed + min_expert_bytes:
        raise BudgetError(
            f"memory budget {format_bytes(budget_bytes)} is below the smallest workable budget "
            f"{format_bytes(minimum)} ({minimum} bytes): fixed cost {format_bytes(fixed_bytes)} + dense weights "
            f"{format_bytes(dense_bytes)} + KV cache {format_bytes(kv_cache_bytes)} + buffers "
            f"{format_bytes(buffer_bytes)} + one MoE layer's top-k experts {format_bytes(min_expert_bytes)}; "
            f"a smaller max_context shrinks the KV cache")
    return MemoryPlan(budget_bytes, fixed_bytes, dense_bytes, kv_cache_bytes, buffer_bytes,
                      budget_bytes - committed, minimum, prefill_chunk)
