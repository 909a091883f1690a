"""The benchmark harness (moeedge.harness): its matrix file, its plan of runs, the
physical bound, records and resuming, the cgroup runner, and the report."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeedge.cgroup import CgroupUnavailable, run_limited
from moeedge.harness import matrix
from moeedge.harness.bound import capacity_experts, physical_bound, shortfall, touched_bytes_per_token
from moeedge.harness.machine import cpu, same_machine
from moeedge.harness.report import load_records, plot, table
from moeedge.runtime.plan import FIXED_JITTER_BYTES

DEFAULT = str(Path(__file__).parents[1] / "python" / "moeedge" / "models_data" / "default")
MiB = 1 << 20


def write(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the matrix file

@pytest.mark.parametrize("text, message", [
    ("[settings\n", "not TOML"),
    ("[settings]\ntokens = 4\n", "no [[model]] entries"),
    ("[settings]\nspeed = 4\n[[model]]\nname='a'\nhf='x'\n", "[settings]"),
    ("[[model]]\nname='a'\nhf='x'\ncolour='red'\n", "[[model]] #1"),
    ("[[model]]\nname='a'\nhf='x'\nengines=['vllm']\n", "unknown engine 'vllm'"),
    ("[[model]]\nname='a'\nhf='x'\nlimits=['lots']\n", "limit 'lots'"),
    ("[[model]]\nname='a'\nhf='x'\nlimits=['experts:1.5']\n", "limit 'experts:1.5'"),
    ("[settings]\nread_throttle = 'fast'\n[[model]]\nname='a'\nhf='x'\n", "[settings]"),
])
def test_bad_matrix_files_name_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as e:
        matrix.read_config(path)
    assert str(path) in str(e.value)


def test_missing_matrix_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        matrix.read_config(tmp_path / "none.toml")


def test_plan_pairs_engines_with_their_weights(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"\0" * 1000)
    (hf / "config.json").write_text("{}")
    q8 = tmp_path / "m-q8_0.gguf"
    q8.write_bytes(b"\0" * 600)
    path = write(tmp_path, f"""
[[model]]
name = "m"
hf = "{hf}"
gguf = {{ bf16 = "{tmp_path / 'm-bf16.gguf'}", q8_0 = "{q8}" }}
precisions = ["bf16", "q8_0"]
engines = ["moeedge", "llama.cpp", "transformers"]
limits = ["unlimited", "0.5", "3MiB", "min", "experts:0.25"]
""")
    _, models = matrix.read_config(path)
    facts = {"min_budget_bytes": 777, "fixed_bytes": 100, "dense_bytes": 20, "kv_cache_bytes": 3, "buffer_bytes": 7,
             "expert_bytes": 400}
    runs = matrix.plan(models, lambda source: facts)
    got = {(r.engine, r.precision, r.limit_label): (Path(r.source).name, r.limit_bytes) for r in runs}
    # transformers has no GGUF path: it runs bf16 only.
    assert ("transformers", "q8_0", "unlimited") not in got
    assert got[("moeedge", "bf16", "0.5")] == ("hf", 500)         # half the safetensors bytes
    assert got[("llama.cpp", "bf16", "0.5")] == ("m-bf16.gguf", 500)  # the same limit for every engine
    assert got[("moeedge", "q8_0", "0.5")] == ("m-q8_0.gguf", 300)
    assert got[("transformers", "bf16", "3MiB")] == ("hf", 3 * MiB)
    assert got[("llama.cpp", "q8_0", "min")] == ("m-q8_0.gguf", 777)
    assert got[("moeedge", "bf16", "unlimited")][1] is None
    # all that moeedge plans beside experts (its fixed cost with the room it varies by), then a quarter of them
    assert got[("moeedge", "bf16", "experts:0.25")] == ("hf", 100 + FIXED_JITTER_BYTES + 20 + 3 + 7 + 100)
    assert len(runs) == 5 * 3 + 5 * 2


# --------------------------------------------------------------------------- the bound

FACTS = {"expert_bytes": 4 * 4 * 100, "moe_layers": 4, "experts": 4, "top_k": 2, "dense_bytes": 1000,
         "vocab": 10, "hidden": 10, "fixed_bytes": 5000, "kv_cache_bytes": 100}


def test_bound_is_compute_when_everything_fits():
    routing = np.array([[[0, 1]] * 4] * 6)  # every token the same two experts
    b = physical_bound(FACTS, routing, prompt_tokens=2, limit_bytes=None, disk_bytes_per_s=100.0,
                       matvec_bytes_per_s=1000.0)
    assert b.miss_bytes == 0 and b.capacity_experts == 16 and b.decode_tokens == 4
    # dense without the embedding table (10 x 10 x 2 bytes) plus 2 experts in each of 4 layers
    assert touched_bytes_per_token(FACTS) == 1000 - 200 + 2 * 4 * 100
    assert b.tok_s == pytest.approx(1000.0 / 1600)


def test_bound_counts_beladys_misses_in_the_decode_steps_only():
    rng = np.random.default_rng(0)
    routing = np.sort(np.stack([rng.choice(4, 2, replace=False) for _ in range(40 * 4)]).reshape(40, 4, 2), axis=2)
    limit = 5000 + 1000 + 100 + 3 * 100 + 50  # room for 3 experts
    assert capacity_experts(FACTS, limit) == 3
    assert physical_bound(FACTS, routing, 8, limit - 200, 1.0, 1.0) is None  # 1 expert: not one layer's 2
    b = physical_bound(FACTS, routing, prompt_tokens=8, limit_bytes=limit, disk_bytes_per_s=100.0,
                       matvec_bytes_per_s=1e9)
    # Brute force: Belady with 3 slots over the whole sequence, misses counted from token 8.
    cache, misses = set(), 0
    flat = [(t, layer, int(e)) for t in range(40) for layer in range(4) for e in routing[t, layer]]
    for i, (t, layer, e) in enumerate(flat):
        key = layer * 4 + e
        if key in cache:
            continue
        misses += t >= 8
        if len(cache) == 3:
            step = {layer * 4 + int(x) for x in routing[t, layer]}

            def next_use(k):
                return next((j for j in range(i + 1, len(flat)) if flat[j][1] * 4 + flat[j][2] == k), len(flat))
            cache.remove(max(cache - step, key=next_use))
        cache.add(key)
    assert b.miss_bytes == misses * 100
    assert b.tok_s == pytest.approx(32 / (misses * 100 / 100.0))


def test_bound_needs_decode_steps():
    with pytest.raises(ValueError, match="no decode steps"):
        physical_bound(FACTS, np.zeros((4, 4, 2), dtype=int), 4, None, 1.0, 1.0)


# --------------------------------------------------------------------------- cgroups

def _cgroups_writable() -> bool:
    try:
        run_limited(["true"], 64 * MiB, 30)
        return True
    except CgroupUnavailable:
        return False


needs_cgroup = pytest.mark.skipif(not _cgroups_writable(), reason="no writable memory cgroup here (not root?)")


@needs_cgroup
def test_a_process_past_its_limit_is_killed_and_counted():
    grab = [sys.executable, "-c", "b = bytearray(400 << 20); b[::4096] = b'x' * len(b[::4096])"]
    r = run_limited(grab, 128 * MiB, 60)
    assert r.returncode != 0 and r.oom_kills >= 1
    assert r.peak_bytes <= 128 * MiB


@needs_cgroup
def test_an_unlimited_run_is_measured():
    grab = [sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); print('ok')"]
    r = run_limited(grab, None, 60)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and r.limit_bytes is None
    assert r.peak_bytes >= 64 * MiB and r.oom_kills == 0


def test_a_timeout_is_exit_124():
    try:
        r = run_limited([sys.executable, "-c", "import time; time.sleep(30)"], None, 1)
    except CgroupUnavailable:
        pytest.skip("no writable memory cgroup here")
    assert r.returncode == 124


def test_limited_runs_are_refused_without_cgroups(tmp_path, monkeypatch):
    monkeypatch.setattr(matrix, "cgroup_writable", lambda: False)
    _machine(tmp_path)
    path = write(tmp_path, f"[settings]\ndisk_probe = false\n[[model]]\nname='d'\nhf='{DEFAULT}'\n"
                           f"engines=['moeedge']\nlimits=['1GiB']\n")
    with pytest.raises(CgroupUnavailable, match="refusing to label results as limited"):
        matrix.main_loop(path, tmp_path / "results", progress=False)
    assert not (tmp_path / "results" / "runs").exists()


# --------------------------------------------------------------------------- end to end

def _machine(tmp_path: Path) -> None:
    """Facts for this host, so that the test does not measure the disk (a 1 GiB file)."""
    (tmp_path / "results").mkdir(exist_ok=True)
    (tmp_path / "results" / "machine.json").write_text(json.dumps({
        "host": socket.gethostname(), "cpu": cpu(), "threads": 2, "disk_bytes_per_s": 1e9,
        "matvec_bytes_per_s": 1e10}))


@needs_cgroup
def _throttle_line(directory: Path) -> str:
    """A read throttle of the matrix's settings where this machine can make one, else none."""
    from moeedge.read_throttle import ReadThrottle, ThrottleUnavailable, disk_of

    try:
        with ReadThrottle(disk_of(directory), 1 << 30):
            return 'read_throttle = "1GiB"'
    except (ThrottleUnavailable, OSError):
        return ""


def test_shortfall_compares_reads_with_beladys():
    bound = type("B", (), {"miss_bytes": 3000, "decode_tokens": 3, "run_miss_bytes": 4500})()
    result = {"tokens": 4, "decode_read_bytes": 4000, "decode_cache_read_bytes": 3900, "decode_read_busy_s": 2.0,
              "stats": {"bytes_read": 6000}}
    got = shortfall(result, bound, disk_bytes_per_s=2000.0)
    assert got["belady_bytes_per_token"] == 1000 and got["read_bytes_per_token"] == pytest.approx(4000 / 3)
    assert got["policy_ratio"] == pytest.approx(0.75) and got["io_ratio"] == pytest.approx(3900 / 2.0 / 2000)
    nothing = type("B", (), {"miss_bytes": 0, "decode_tokens": 3, "run_miss_bytes": 0})()
    assert shortfall({"tokens": 4, "stats": {"bytes_read": 0}}, nothing, 1.0)["policy_ratio"] == 1.0
    llama = shortfall({"tokens": 4, "decode_read_bytes": 300}, bound, 1.0)  # no expert reads of its own
    assert llama["policy_ratio"] is None and llama["read_bytes_per_token"] == 100 and llama["occupancy"] is None
    timed = {"tokens": 3, "token_wait_s": [0.5, 0.1], "token_other_s": [0.5, 0.9], "decode_kernel_s": 1.0}
    assert shortfall(timed, bound, 1.0)["occupancy"] == pytest.approx((1.0 + 0.6) / 2.0)


def test_matrix_records_each_run_and_skips_it_next_time(tmp_path):
    _machine(tmp_path)
    path = write(tmp_path, f"""
[settings]
tokens = 4
prompt_tokens = 4
timeout_s = 300
disk_probe = false
{_throttle_line(Path(DEFAULT))}
[[model]]
name = "default"
hf = "{DEFAULT}"
engines = ["moeedge", "moeedge-naive"]
limits = ["unlimited", "min"]
""")
    records = matrix.main_loop(path, tmp_path / "results", progress=False)
    assert len(records) == 4
    for r in records:
        assert set(matrix.RECORD_KEYS) <= set(r), r
        assert r["error"] is None and r["oom_kills"] == 0 and r["cold"] == (os.geteuid() == 0)
        assert r["decode_tok_s"] > 0 and r["bound_tok_s"] > 0 and r["same_tokens_as_reference"] is True
        assert len(r["result"]["token_wait_s"]) == 3
        if r["limit_bytes"] is not None:
            assert r["peak_bytes"] <= r["limit_bytes"]
        # Belady's cache of the same size never reads more experts than the engine did
        assert r["policy_ratio"] is not None and 0 < r["policy_ratio"] <= 1.0, r["policy_ratio"]
        assert 0 < r["occupancy"] <= 1.0
    files = sorted((tmp_path / "results" / "runs" / "default").glob("*.json"))
    assert len(files) == 4
    stamps = [f.stat().st_mtime_ns for f in files]
    again = matrix.main_loop(path, tmp_path / "results", progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing rerun
    assert [r["decode_tok_s"] for r in again] == [r["decode_tok_s"] for r in records]
    # The machine measured again: every bound follows it.
    machine = json.loads((tmp_path / "results" / "machine.json").read_text())
    machine["matvec_bytes_per_s"] /= 10
    (tmp_path / "results" / "machine.json").write_text(json.dumps(machine))
    assert matrix.refresh_bounds(tmp_path / "results") == 4
    refreshed = {r["limit_label"] + r["engine"]: r for r in load_records(tmp_path / "results")}
    for r in records:
        new = refreshed[r["limit_label"] + r["engine"]]
        assert new["bound_tok_s"] < r["bound_tok_s"] and new["machine"]["matvec_bytes_per_s"] == 1e9
    shown = table(load_records(tmp_path / "results"))
    assert shown.count("| default | bf16 |") == 4
    assert [p.name for p in plot(load_records(tmp_path / "results"), tmp_path / "plots")] == ["default.png"]


def test_the_harness_process_never_maps_torch():
    """Pages of libraries the harness maps would be shared uncharged with the runs' processes."""
    code = ("import sys; from moeedge.harness import matrix, report, bound, engines; "
            "v = matrix.versions(); assert v['torch'], v; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    for argv in (["bench", "matrix", str(tmp_path / "none.toml")], ["bench", "report", "--results", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "moeedge.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and str(tmp_path) in r.stderr


def test_saved_machine_facts_from_another_cpu_are_not_this_machines():
    """Every virtual machine here is named "vm": facts measured on an Intel host must not bound
    runs on an AMD one (the matrix measures again instead)."""
    here = {"host": socket.gethostname(), "threads": 2, "cpu": cpu()}
    assert same_machine(here, 2)
    assert not same_machine({**here, "threads": 1}, 2)
    assert not same_machine({**here, "cpu": {**cpu(), "model": "Some Other CPU @ 1.00GHz"}}, 2)
    if cpu()["flags"]:
        assert not same_machine({**here, "cpu": {**cpu(), "flags": []}}, 2)
    assert not same_machine({"host": socket.gethostname(), "threads": 2}, 2)  # saved before the CPU was
