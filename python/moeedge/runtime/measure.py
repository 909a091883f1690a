"""What the memory plan starts from, measured: this process's resident memory, its
cgroup's limit (v2 or v1, read once), and what the machine has available. Nothing here
decides where bytes go; moeedge.runtime.plan does."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from moeedge.units import parse_bytes


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def controller_cgroup(controller: str) -> tuple[Path, int] | None:
    """(directory, version) of this process's cgroup for a controller ("memory", "blkio"):
    v1's hierarchy of that controller if it is mounted, else v2's unified one; None where
    /proc/self/cgroup names neither."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    for _, controllers, path in entries:
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/"), 1
    for _, controllers, path in entries:
        if controllers == "":
            return Path("/sys/fs/cgroup") / path.lstrip("/"), 2
    return None


def memory_cgroup() -> tuple[Path, int] | None:
    """(directory, version) of this process's memory cgroup (controller_cgroup)."""
    return controller_cgroup("memory")


def cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup, or None when unlimited or unreadable."""
    found = memory_cgroup()
    if found is None:
        return None
    directory, version = found
    try:
        value = (directory / ("memory.max" if version == 2 else "memory.limit_in_bytes")).read_text().strip()
    except OSError:
        return None
    if value == "max" or not value.isdigit() or int(value) >= 1 << 60:
        return None
    return int(value)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def is_smallest(budget: int | str) -> bool:
    """budget="min": the smallest workable budget, which only the planner can work out."""
    return isinstance(budget, str) and budget.strip().lower() == "min"


def resolve_budget(budget: int | str) -> int:
    """'auto': the cgroup limit if one is set, else what this process holds plus 80% of what is available."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        limit = cgroup_limit_bytes()
        return limit if limit is not None else rss_bytes() + int(0.8 * available_bytes())
    return parse_bytes(budget)
