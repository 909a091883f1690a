"""moeedge.runtime.pressure: the budget memory cgroups, their other processes and memory
pressure leave this process (load(adaptive=True, memory_budget="auto"))."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from moeedge.cgroup import CgroupUnavailable, run_limited
from moeedge.runtime import pressure

MiB = 1 << 20


def cgroup_dir(path: Path, limit: str, stat: str) -> Path:
    path.mkdir(parents=True)
    (path / "memory.limit_in_bytes").write_text(limit + "\n")
    (path / "memory.stat").write_text(stat)
    return path


def test_the_tightest_limited_ancestor_less_its_other_processes_binds(tmp_path):
    root = tmp_path / "memory"
    parent = cgroup_dir(root / "shared", str(600 * MiB), f"cache 1000\ntotal_rss {400 * MiB}\n")
    child = cgroup_dir(parent / "me", "9223372036854771712", f"total_rss {150 * MiB}\n")
    r = pressure.reading((child, 1), rss=150 * MiB, root=root, pressure_file=tmp_path / "none")
    # the parent's 600 MiB, less the others' 250 MiB, less a reserve of 600/16 MiB
    assert r.limit_bytes == 600 * MiB and r.others_bytes == 250 * MiB and r.source == str(parent)
    assert r.budget_bytes == 600 * MiB - 250 * MiB - 600 * MiB // 16
    assert r.pressure is None
    (child / "memory.limit_in_bytes").write_text(str(200 * MiB))  # a tighter limit of its own
    r = pressure.reading((child, 1), rss=150 * MiB, root=root, pressure_file=tmp_path / "none")
    assert r.source == str(child) and r.budget_bytes == 200 * MiB - 32 * MiB


def test_no_limit_anywhere_is_what_is_available(tmp_path):
    root = tmp_path / "memory"
    child = cgroup_dir(root / "me", "9223372036854771712", "total_rss 0\n")
    r = pressure.reading((child, 1), rss=100 * MiB, root=root)
    assert r.limit_bytes is None and r.source == "MemAvailable" and r.budget_bytes > 100 * MiB


def test_pressure_is_read_from_psi(tmp_path):
    psi = tmp_path / "memory"
    psi.write_text("some avg10=12.50 avg60=3.00 avg300=1.00 total=99\nfull avg10=1.00 avg60=0 avg300=0 total=9\n")
    assert pressure.memory_pressure(psi) == 12.5
    psi.write_text("garbage\n")
    assert pressure.memory_pressure(psi) is None
    assert pressure.memory_pressure(tmp_path / "absent") is None


def test_a_real_cgroup_limit_is_seen_from_inside():
    code = ("from moeedge.runtime import pressure; r = pressure.reading(); "
            "print(r.limit_bytes, r.budget_bytes)")
    try:
        run = run_limited([sys.executable, "-c", code], 700 * MiB, timeout=120)
    except CgroupUnavailable as e:
        pytest.skip(str(e))
    assert run.returncode == 0, run.stderr
    limit, budget = map(int, run.stdout.split())
    assert limit == 700 * MiB and 0 < budget < limit
