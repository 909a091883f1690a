"""moeedge.read_throttle: a child cgroup whose reads of a disk are held to a rate (root, and a
blkio or io controller, needed: skipped otherwise)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from moeedge.cgroup import evict_files, run_limited
from moeedge.read_throttle import ReadThrottle, ThrottleUnavailable, disk_of

READER = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
start, n = time.perf_counter(), 0
while (got := os.readv(fd, [buf])) > 0:
    n += got
print(n / (time.perf_counter() - start))
"""


def throttle_or_skip(path: Path, rate: int) -> ReadThrottle:
    if os.geteuid() != 0:
        pytest.skip("needs root to make cgroups")
    try:
        return ReadThrottle(disk_of(path), rate)
    except ThrottleUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def data_file():
    directory = Path(os.environ.get("MOEEDGE_BENCH_DIR", "/var/tmp"))
    path = directory / f"moeedge-throttle-{os.getpid()}.bin"
    path.write_bytes(os.urandom(12 << 20))
    yield path
    path.unlink()


def read_rate(path: Path, join) -> float:
    evict_files([path])
    r = run_limited([sys.executable, "-c", READER, str(path)], None, 60, also_join=join)
    assert r.returncode == 0, r.stderr
    return float(r.stdout)


def test_reads_in_the_cgroup_keep_to_the_rate_and_follow_a_change(data_file):
    with throttle_or_skip(data_file, 8 << 20) as throttle:
        slow = read_rate(data_file, [throttle.procs])
        assert slow < 1.5 * (8 << 20)  # 12 MiB at 8 MiB/s: about 1.5 s (the first burst may go faster)
        throttle.set(64 << 20)
        assert read_rate(data_file, [throttle.procs]) > 2 * slow
        directory = throttle.dir
    assert not directory.exists()


def test_bad_rates_and_non_disks_are_refused(data_file):
    with throttle_or_skip(data_file, 8 << 20) as throttle:
        with pytest.raises(ValueError, match="positive rate"):
            throttle.set(0)
    with pytest.raises(ThrottleUnavailable, match="not on a block device"):
        disk_of("/proc/self/status")
