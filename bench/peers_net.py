"""Emulated devices for the peer benchmarks (root only): each one a network namespace joined
to the others by a veth pair shaped with tc (tbf), a core of its own (a cpuset cgroup) and a
memory cgroup limiting its whole process tree. The kernel here has no netem: no delay is added."""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

from moeedge.runtime.measure import memory_cgroup

CPUSET_ROOT = Path("/sys/fs/cgroup/cpuset")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Link:
    """Namespaces a and b, addresses 10.77.0.1 and 10.77.0.2, each end's egress shaped. tbf
    queues queue_ms of traffic beyond its burst and drops the rest: a shallow queue makes TCP
    lose packets on a transfer larger than it, and slows that transfer by more than its size."""

    def __init__(self, rate_mbit: float, tag: str | None = None, min_burst: int = 32 << 10, queue_ms: int = 50):
        self.tag = tag or uuid.uuid4().hex[:6]
        self.min_burst = min_burst
        self.queue_ms = queue_ms
        self.ns = [f"mea{self.tag}", f"meb{self.tag}"]
        self.addr = ["10.77.0.1", "10.77.0.2"]
        for ns in self.ns:
            sh("ip", "netns", "add", ns)
        va, vb = f"vea{self.tag}", f"veb{self.tag}"
        sh("ip", "link", "add", va, "netns", self.ns[0], "type", "veth", "peer", "name", vb, "netns", self.ns[1])
        for ns, dev, addr in zip(self.ns, (va, vb), self.addr):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.devs = [va, vb]
        self.rate_mbit = None
        self.shape(rate_mbit)

    def shape(self, rate_mbit: float) -> None:
        """Each direction at rate_mbit (tbf; burst one 10 ms worth, at least min_burst)."""
        verb = "add" if self.rate_mbit is None else "change"
        burst = max(self.min_burst, int(rate_mbit * 1e6 / 8 / 100))
        for ns, dev in zip(self.ns, self.devs):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", dev, "root", "tbf", "rate",
               f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{self.queue_ms}ms")
        self.rate_mbit = rate_mbit

    def close(self) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Device:
    """A core and a memory limit: commands started through it run in both, in a namespace."""

    def __init__(self, core: int, limit_bytes: int):
        mem_parent, version = memory_cgroup()
        if version != 1:
            raise RuntimeError("these benchmarks use cgroup v1 (memory and cpuset controllers)")
        name = f"moeedge-peer-{uuid.uuid4().hex[:8]}"
        self.mem = mem_parent / name
        self.mem.mkdir()
        (self.mem / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.cpu = CPUSET_ROOT / name
        self.cpu.mkdir()
        (self.cpu / "cpuset.cpus").write_text(str(core))
        (self.cpu / "cpuset.mems").write_text((CPUSET_ROOT / "cpuset.mems").read_text().strip())
        self.core, self.limit_bytes = core, limit_bytes

    def command(self, ns: str, cmd: list[str]) -> list[str]:
        """cmd joined to this device's cgroups before it execs, in namespace ns."""
        join = f'echo $$ > "{self.mem}/cgroup.procs" && echo $$ > "{self.cpu}/cgroup.procs" && exec "$@"'
        return ["sh", "-c", join, "sh", "ip", "netns", "exec", ns, *cmd]

    def peak_bytes(self) -> int:
        return int((self.mem / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.mem / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        """Remove both cgroups, waiting up to 30 s for the last processes in them to exit."""
        for group in (self.mem, self.cpu):
            for _ in range(300):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: a process (p2pd) is still exiting
                    time.sleep(0.1)


def is_root() -> bool:
    return os.geteuid() == 0
