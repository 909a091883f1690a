"""A read-bandwidth limit on one disk for the processes of a child cgroup: cgroup v1's
blkio.throttle.read_bps_device, or v2's io.max. A shared virtual disk swings several-fold
between runs and its host side caches re-reads; under a throttle set below its slowest rate
every engine sees the same, stable bandwidth, and a bound can use that number."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from moeedge.cgroup import remove_cgroup
from moeedge.runtime.measure import controller_cgroup


class ThrottleUnavailable(RuntimeError):
    """No writable blkio (v1) or io (v2) controller here."""


def disk_of(path: str | os.PathLike) -> str:
    """"MAJ:MIN" of the whole disk holding path (a throttle on a partition does not apply)."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        raise ThrottleUnavailable(f"{path} is not on a block device (device {os.major(dev)}:{os.minor(dev)}): "
                                  "nothing to throttle")
    if (node / "partition").exists():  # a partition: its parent directory in sysfs is the disk
        return (node.resolve().parent / "dev").read_text().strip()
    return (node / "dev").read_text().strip()


def _io_cgroup() -> tuple[Path, int]:
    found = controller_cgroup("blkio")
    if found is None:
        raise ThrottleUnavailable("no blkio or io cgroup controller in /proc/self/cgroup")
    return found


class ReadThrottle:
    """A child cgroup whose processes read the disk at most bytes_per_s; a process joins it by
    writing its pid to procs (before it execs, so all of its reads count). set() changes the
    rate while they run. Removed on close()."""

    def __init__(self, disk: str, bytes_per_s: int):
        parent, self.version = _io_cgroup()
        self.disk = disk
        self.dir = parent / f"moeedge-io-{uuid.uuid4().hex[:12]}"
        try:
            self.dir.mkdir()
        except OSError as e:
            raise ThrottleUnavailable(f"cannot create an io cgroup under {parent}: {e.strerror}") from None
        try:
            self.set(bytes_per_s)
        except BaseException:
            self.close()
            raise

    @property
    def procs(self) -> Path:
        return self.dir / "cgroup.procs"

    def set(self, bytes_per_s: int | None) -> None:
        """The read limit from now on; None lifts it."""
        if bytes_per_s is not None and bytes_per_s < 1:
            raise ValueError(f"a read throttle needs a positive rate, got {bytes_per_s}")
        try:
            if self.version == 1:
                (self.dir / "blkio.throttle.read_bps_device").write_text(f"{self.disk} {bytes_per_s or 0}")
            else:
                (self.dir / "io.max").write_text(f"{self.disk} rbps={bytes_per_s or 'max'}")
        except OSError as e:
            raise ThrottleUnavailable(f"cannot throttle disk {self.disk} in {self.dir}: {e.strerror}") from None
        self.bytes_per_s = bytes_per_s

    def close(self) -> None:
        remove_cgroup(self.dir)

    def __enter__(self) -> "ReadThrottle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
