"""What memory this process may use now, watched while it runs (moeedge.load(adaptive=True,
memory_budget="auto")): the limits of its memory cgroup and of every ancestor, what
the cgroup's other processes hold, memory pressure, and what the machine has available.

For each cgroup from this process's own up to the hierarchy's root that has a limit L,
the budget it leaves is L less what the others in it hold (its anonymous memory less
this process's resident memory: page cache is reclaimable and not counted) less a
reserve (RESERVE_FRACTION of L, at least RESERVE_MIN_BYTES), the room another process
grows into while this one gives memory back; the budget is the smallest of these. With
no limit anywhere it is what load() takes for "auto": resident memory plus 80% of
MemAvailable. /proc/pressure/memory's "some avg10" (the share of the last 10 s some task
stalled on memory) is read where the kernel has it: above PRESSURE_HOLD the budget may
fall but not rise (the controller's caller holds it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeedge.runtime.measure import available_bytes, memory_cgroup, rss_bytes

RESERVE_FRACTION = 1 / 16
RESERVE_MIN_BYTES = 32 << 20
PRESSURE_HOLD = 10.0  # percent
UNLIMITED = 1 << 60


@dataclass
class Reading:
    budget_bytes: int
    limit_bytes: int | None   # the binding cgroup's limit, None with none
    others_bytes: int         # what the binding cgroup's other processes hold
    pressure: float | None    # some avg10, percent; None where the kernel has no PSI
    source: str               # which cgroup (or "MemAvailable") set the budget


def read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_pressure(path: Path = Path("/proc/pressure/memory")) -> float | None:
    """The 'some avg10' of /proc/pressure/memory, percent; None where absent or unreadable."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("some "):
                fields = dict(f.split("=", 1) for f in line.split()[1:])
                return float(fields["avg10"])
    except (OSError, ValueError, KeyError):
        return None
    return None


def anon_bytes(directory: Path, version: int) -> int:
    """Anonymous memory charged to a cgroup and its descendants (v1 total_rss, v2 anon)."""
    wanted = "total_rss" if version == 1 else "anon"
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == wanted:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def ancestors(directory: Path, root: Path) -> list[Path]:
    """directory and each parent up to root (root itself has no limit to read)."""
    out = []
    while directory != root and root in directory.parents:
        out.append(directory)
        directory = directory.parent
    return out


def reading(cgroup: tuple[Path, int] | None = None, rss: int | None = None, root: Path | None = None,
            pressure_file: Path = Path("/proc/pressure/memory")) -> Reading:
    """The budget now (module docstring). cgroup: (directory, version), default this
    process's; root: its hierarchy's root (default /sys/fs/cgroup[/memory])."""
    rss = rss_bytes() if rss is None else rss
    cgroup = memory_cgroup() if cgroup is None else cgroup
    pressure = memory_pressure(pressure_file)
    best = Reading(rss + int(0.8 * available_bytes()), None, 0, pressure, "MemAvailable")
    if cgroup is None:
        return best
    directory, version = cgroup
    if root is None:
        root = Path("/sys/fs/cgroup/memory") if version == 1 else Path("/sys/fs/cgroup")
    for d in ancestors(directory, root):
        limit = read_int(d / ("memory.limit_in_bytes" if version == 1 else "memory.max"))
        if limit is None or limit >= UNLIMITED:
            continue
        others = max(0, anon_bytes(d, version) - rss)
        budget = limit - others - max(RESERVE_MIN_BYTES, int(limit * RESERVE_FRACTION))
        if best.limit_bytes is None or budget < best.budget_bytes:
            best = Reading(budget, limit, others, pressure, str(d))
    return best
