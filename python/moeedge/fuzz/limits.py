"""The memory limit each fuzz child runs under: a child memory cgroup of the fork
server's own (cgroup v1 or v2), so that the kernel's OOM killer, not the machine's,
stops a child that allocates past it, and memory.oom_control / memory.events tell that
kill apart from any other SIGKILL. Where no cgroup is writable, RLIMIT_AS in the child
instead (then running out shows as MemoryError or a failed allocation, and the report
says the limit was an address-space one)."""
from __future__ import annotations

import os
import resource
import uuid

from moeedge.cgroup import oom_kills, remove_cgroup
from moeedge.runtime.measure import memory_cgroup


class MemoryLimit:
    kind = "none"

    def enter(self) -> None:
        """Called in the child, before it runs anything."""

    def oom_kills(self) -> int:
        return 0

    def close(self) -> None:
        pass


class CgroupLimit(MemoryLimit):
    """One cgroup reused for every child of one fork server (children run one at a time
    in it): its oom_kill counter is read before and after each child."""

    def __init__(self, limit_bytes: int):
        found = memory_cgroup()
        if found is None:
            raise OSError("no memory cgroup in /proc/self/cgroup")
        parent, self.version = found
        self.kind = f"cgroup v{self.version}"
        self.limit_bytes = limit_bytes
        self.path = parent / f"moeedge-fuzz-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()  # OSError where the hierarchy is read-only or not ours
        try:
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                try:  # no swap either: the limit covers memory and swap together
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                except OSError:
                    pass  # no swap accounting (and so no swap to escape to)
            else:
                (self.path / "memory.max").write_text(str(limit_bytes))
                try:
                    (self.path / "memory.swap.max").write_text("0")
                except OSError:
                    pass
        except OSError:
            self.close()
            raise
        self._procs = str(self.path / "cgroup.procs")

    def enter(self) -> None:
        with open(self._procs, "w") as f:
            f.write(str(os.getpid()))

    def oom_kills(self) -> int:
        return oom_kills(self.path / ("memory.oom_control" if self.version == 1 else "memory.events"))

    def close(self) -> None:
        remove_cgroup(self.path)


class RlimitLimit(MemoryLimit):
    """RLIMIT_AS at the child's address space at fork plus the limit: the fork server's
    own mappings (torch's, mostly untouched) do not count against the input."""

    kind = "RLIMIT_AS"

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes

    def enter(self) -> None:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + self.limit_bytes, size + self.limit_bytes))


def memory_limit(limit_bytes: int) -> tuple[MemoryLimit, str | None]:
    """A cgroup limit if one can be made here, else RLIMIT_AS; and why not a cgroup (None: it is one)."""
    try:
        return CgroupLimit(limit_bytes), None
    except OSError as e:
        return RlimitLimit(limit_bytes), f"no writable memory cgroup ({e}); children run under RLIMIT_AS instead"
