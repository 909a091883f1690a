"""Fuzzing as a test (moeedge.fuzz): a short seeded run over every input class must end
every input in success or one clean error; and the harness itself tells each outcome
apart (stub targets that raise, sleep, allocate past the limit, or kill themselves)."""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moeedge.formats.errors import CheckpointError
from moeedge.fuzz import gguf_file as G
from moeedge.fuzz.forkserver import run_child
from moeedge.fuzz.classes import CLASS_NAMES, generate
from moeedge.fuzz.inputs import FuzzInput, materialize
from moeedge.fuzz.limits import CgroupLimit, RlimitLimit, memory_limit
from moeedge.fuzz.outcomes import (CLEAN_ERROR, CRASH, ESCAPE, HANG, OOM, SUCCESS, TRACEBACK, classify_cli,
                                   classify_exception)
from moeedge.fuzz.seeds import build_seeds
from moeedge.fuzz.targets import Settings, escaped, exception_result, load_target

# The CI run: every class, 50 of each; ~45 s on 2 cores (~10 s of imports, seeds and warm-up). The
# timeout is above moeedge's own limits (a chat input renders twice under a 5 s deadline): only a
# real hang costs it.
SHORT_RUN = ["--seed", "0", "--count", "300", "--timeout", "30", "--jobs", "2"]


@pytest.fixture(scope="module")
def seeds():
    return build_seeds()


@pytest.fixture
def limit():
    lim, _ = memory_limit(256 << 20)
    yield lim
    lim.close()


def stub(action):
    """A target that runs action() and classifies what it raised, as the real targets do."""
    def target(report):
        try:
            action()
        except BaseException as e:  # noqa: BLE001
            return exception_result(e)
        return {"outcome": SUCCESS, "detail": "returned"}

    return target


# --------------------------------------------------------------------------- the short run

@pytest.mark.slow
def test_short_seeded_run_has_no_bad_outcomes(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, "-m", "moeedge.fuzz", *SHORT_RUN, "--failures", str(tmp_path / "failures"),
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert out.is_file(), proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert list(summary["table"]) == list(CLASS_NAMES)
    failures = [f"[{f['class']}] {f['outcome']}: {f['exception']} at {f['where']} x{f['count']} "
                f"(e.g. {f['examples'][0]}: {f['description'][:120]})" for f in summary["distinct_failures"]]
    assert not failures, proc.stdout[-6000:]
    assert proc.returncode == 0


# --------------------------------------------------------------------------- the harness

def test_known_good_input_gives_success_equal_to_the_reference(tmp_path, seeds, limit):
    path = materialize(FuzzInput("good", 0, "mixtral", "the seed unchanged", "load"), seeds, tmp_path / "in")
    result = run_child(load_target(str(path), Settings(256 << 20)), 120, limit, str(tmp_path / "out.txt"),
                       str(tmp_path))
    assert result.outcome == SUCCESS, (result, (tmp_path / "out.txt").read_text()[-2000:])
    assert "equal to the reference" in result.detail


def test_key_error_gives_traceback(limit):
    result = run_child(stub(lambda: {}["missing"]), 30, limit)
    assert result.outcome == TRACEBACK
    assert result.final["exception"] == "KeyError"


def test_one_line_checkpoint_error_is_clean_and_several_lines_are_not(limit):
    def raise_(exc):
        def action():
            raise exc
        return action

    assert run_child(stub(raise_(CheckpointError("x.json: not valid JSON"))), 30, limit).outcome == CLEAN_ERROR
    assert run_child(stub(raise_(ValueError("one\ntwo"))), 30, limit).outcome == TRACEBACK
    assert run_child(stub(raise_(RecursionError("deep"))), 30, limit).outcome == TRACEBACK


def test_sleeping_target_gives_hang(limit):
    start = time.monotonic()
    result = run_child(stub(lambda: time.sleep(60)), 1.0, limit)
    assert result.outcome == HANG
    assert time.monotonic() - start < 10


def _allocate_past(limit_bytes: int):
    def action():
        blocks = []
        for _ in range(8 * limit_bytes // (64 << 20)):
            blocks.append(b"\1" * (64 << 20))  # written, so resident: the limit is hit, not just reserved
    return action


def test_allocation_past_a_cgroup_limit_gives_oom():
    try:
        lim = CgroupLimit(128 << 20)
    except OSError as e:
        pytest.skip(f"no writable memory cgroup here ({e}): the OOM killer cannot be told apart")
    try:
        result = run_child(stub(_allocate_past(128 << 20)), 60, lim)
    finally:
        lim.close()
    assert result.outcome == OOM, result
    assert "OOM killer" in result.detail


def test_allocation_past_rlimit_gives_oom():
    result = run_child(stub(_allocate_past(128 << 20)), 60, RlimitLimit(128 << 20))
    assert result.outcome == OOM, result


def test_sigsegv_gives_crash(limit):
    def segfault():
        faulthandler.disable()  # pytest's would print the child's stack into this run's output
        os.kill(os.getpid(), signal.SIGSEGV)

    result = run_child(stub(segfault), 30, limit)
    assert result.outcome == CRASH
    assert "SIGSEGV" in result.detail


def test_exit_without_a_result_gives_crash(limit):
    assert run_child(stub(lambda: os._exit(3)), 30, limit).outcome == CRASH


# --------------------------------------------------------------------------- the rules

def test_exception_rule():
    assert classify_exception(CheckpointError("bad"))[0] == CLEAN_ERROR
    assert classify_exception(RuntimeError("the model is closed"))[0] == CLEAN_ERROR
    assert classify_exception(ValueError(""))[0] == TRACEBACK
    assert classify_exception(ValueError("x" * 5000))[0] == TRACEBACK
    assert classify_exception(TypeError("bad"))[0] == TRACEBACK
    assert classify_exception(OSError("bad"))[0] == TRACEBACK
    assert classify_exception(MemoryError())[0] == OOM


def test_cli_rule():
    assert classify_cli(0, "")[0] == SUCCESS
    assert classify_cli(2, "moeedge: error: x.gguf: not a GGUF file\n")[0] == CLEAN_ERROR
    assert classify_cli(2, "moeedge: error: a\nmore\n")[0] == TRACEBACK
    assert classify_cli(1, "Traceback (most recent call last):\n  ...\nKeyError: 'a'\n")[0] == TRACEBACK
    assert classify_cli(2, "moeedge: error: " + "x" * 5000)[0] == TRACEBACK


def test_escape_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOEEDGE_FUZZ_CANARY", "c4n4ry")
    assert escaped(["a reply"], "<s><|user|>hello") is None
    assert escaped([], "uid=0(root) gid=0(root)") is not None
    assert escaped(["... c4n4ry ..."]) is not None
    (tmp_path / "fuzz-escape-marker").write_text("")
    assert escaped([]) is not None
    assert ESCAPE != SUCCESS


# --------------------------------------------------------------------------- the inputs

def test_same_seed_same_inputs(seeds):
    for cls in CLASS_NAMES:
        for index in range(4):
            a, b = generate(cls, 7, index, seeds), generate(cls, 7, index, seeds)
            assert (a.description, a.target, a.files, a.outside) == (b.description, b.target, b.files, b.outside)
    assert [generate("config", 7, i, seeds).files for i in range(6)] != \
           [generate("config", 8, i, seeds).files for i in range(6)]


def test_gguf_seed_reads_back_with_gguf(seeds):
    from gguf import GGUFReader

    for name, spec in seeds.gguf.items():
        reader = GGUFReader(seeds.gguf_path(name))
        assert [t.name for t in reader.tensors] == [t.name for t in spec.tensors]
        assert reader.fields["llama.block_count"].contents() == spec.kv("llama.block_count").value
        assert reader.fields["tokenizer.ggml.tokens"].contents() == spec.kv("tokenizer.ggml.tokens").value
        assert seeds.gguf_path(name).read_bytes() == G.to_bytes(spec)


def test_bad_flags_exit_2():
    proc = subprocess.run([sys.executable, "-m", "moeedge.fuzz", "--classes", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown class" in proc.stderr
