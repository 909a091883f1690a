"""The `moeedge` command: what it prints, and one clear line with exit status 2 for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def moeedge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeedge.cli", *args], capture_output=True, text=True, timeout=120)


def test_version_names_cpu_features():
    run = moeedge("version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("moeedge ") and "CPU features" in run.stdout


def test_bench_io_json_reports_positive_throughput(tmp_path):
    run = moeedge("bench", "io", "--dir", str(tmp_path), "--file-bytes", "8MiB", "--expert-bytes", "1MiB", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["file_bytes"] == 8 << 20 and report["expert_bytes"] == 1 << 20
    assert report["sequential_buffered_gbps"] > 0
    assert report["cache_buffered_gbps"] > 0 and report["cache_direct_gbps"] > 0
    assert report["direct_io"] or report["direct_io_fallback"]
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


@pytest.mark.parametrize("args, message", [
    (["bench", "io", "--dir", "/nonexistent/dir"], "is not a directory"),
    (["bench", "io", "--expert-bytes", "12 apples"], "not a byte count"),
    (["bench", "io", "--file-bytes", "1MiB", "--expert-bytes", "2MiB"], "must hold at least one expert"),
    (["bench", "io", "--expert-bytes", "0"], "must be positive"),
    (["bench", "io", "--file-bytes", "1000TiB"], "more than half the free space"),
    (["no-such-command"], "invalid choice"),
])
def test_bad_input_exits_2_without_traceback(args, message):
    run = moeedge(*args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
