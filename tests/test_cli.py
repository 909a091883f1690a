"""The `moeedge` command: what it prints, and one clear line with exit status 2 for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moeedge.runtime.plan import FIXED_JITTER_BYTES, SLACK_BYTES


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
    (["info", "--max-context", "-5"], "--max-context must be positive, got -5"),
    (["run", "--prompt", "x", "--max-context", "0"], "--max-context must be positive, got 0"),
])
def test_bad_input_exits_2_without_traceback(args, message):
    run = moeedge(*args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_info_reports_sizes_and_minimum_budget(chat_model):
    run = moeedge("info", str(chat_model), "--json")
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout)
    assert facts["architecture"] == "mixtral" and facts["experts"] == 6 and facts["top_k"] == 2
    assert facts["expert_bytes"] == 3 * 6 * 3 * 96 * 64 * 4
    # the minimum holds the parts it reports, one layer's top-k experts and the fixed cost's jitter
    # (and a prefill step's activations beyond one decode step's buffers)
    planned = sum(facts[k] for k in ("fixed_bytes", "dense_bytes", "kv_cache_bytes", "buffer_bytes"))
    assert facts["buffer_bytes"] >= SLACK_BYTES
    assert facts["min_budget_bytes"] >= planned + 2 * 3 * 96 * 64 * 4 + FIXED_JITTER_BYTES


def test_info_reports_a_switch_model(tmp_path):
    from tiny_switch import make_switch

    make_switch(tmp_path)
    run = moeedge("info", str(tmp_path), "--json")
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout)
    assert facts["architecture"] == "switch_transformers" and facts["top_k"] == 1
    assert facts["moe_layers"] >= 1 and facts["layers"] > facts["moe_layers"]
    assert facts["min_budget_bytes"] > facts["fixed_bytes"] + facts["dense_bytes"]


def test_run_json_prints_text_and_stats(chat_model):
    run = moeedge("run", str(chat_model), "--prompt", "the quick", "--max-new-tokens", "6", "--json",
                  "--memory-budget", "4GiB")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert isinstance(out["text"], str) and out["stats"]["generated_tokens"] <= 6
    assert out["stats"]["hits"] + out["stats"]["misses"] > 0


def test_run_is_deterministic_with_a_seed(chat_model):
    args = ("run", str(chat_model), "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0.8",
            "--seed", "3")
    assert moeedge(*args).stdout == moeedge(*args).stdout


def test_chat_session_commands(chat_model, tmp_path):
    saved = tmp_path / "conv.json"
    script = f"hello there\n/save {saved}\n/reset\n/load {saved}\n/stats\nhow are you\n/quit\n"
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "chat", str(chat_model), "--max-new-tokens", "5"],
                         input=script, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "(saved 2 messages" in run.stdout and "(loaded 2 messages" in run.stdout
    assert run.stdout.count("tok/s, cache hit rate") == 2
    assert len(json.loads(saved.read_text())["messages"]) == 2


def test_chat_load_of_a_bad_file_says_why_and_goes_on(chat_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}))
    script = f"/load {bad}\n/load {tmp_path / 'missing.json'}\n/nonsense\n/quit\n"
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "chat", str(chat_model), "--max-new-tokens", "5"],
                         input=script, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"(cannot load {bad}: each message needs a role and a content)" in run.stdout
    assert "(cannot load" in run.stdout.split(str(bad), 2)[-1] and "missing.json" in run.stdout
    assert run.stdout.count("commands: /reset") == 2  # at the start, and for the unknown command


@pytest.mark.parametrize("args, message", [
    (["run", "/no/such/model", "--prompt", "x"], "no such file or directory"),
    (["run", "{model}", "--prompt", "x", "--memory-budget", "10MB"], "below the smallest workable budget"),
    (["run", "{model}", "--prompt", "x", "--memory-budget", "lots"], "not a byte count"),
    (["run", "{model}", "--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["run", "{model}", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["chat", "{model}", "--top-p", "5"], "--top-p must be in (0, 1], got 5.0"),
    (["chat", "{model}", "--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["run", "{model}", "--prompt", "x", "--min-p", "1.5"], "--min-p must be in [0, 1]"),
    (["chat", "{model}", "--repeat-penalty", "0"], "--repeat-penalty must be a finite number > 0"),
    (["run", "{model}", "--prompt", "x", "--repeat-last-n", "-2"], "--repeat-last-n must be an integer >= 0"),
    (["run", "{model}", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["chat", "{model}", "--stop", ""], "--stop needs some text"),
    (["run", "{model}", "--prompt", "x", "--max-context", "0"], "--max-context must be positive"),
    (["run", "{model}", "--prompt", "x", "--max-new-tokens", "100000"], "exceed max_context"),
    (["info", "{bad}"], "not valid JSON"),
    (["info", "{pickle}"], "moeedge never unpickles"),
    (["info", "{file}"], "not a checkpoint moeedge reads"),
])
def test_model_commands_bad_input_exit_2(chat_model, tmp_path, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text((chat_model / "config.json").read_text())
    (pickle / "pytorch_model.bin").write_bytes(b"x")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    names = {"{model}": str(chat_model), "{bad}": str(bad), "{pickle}": str(pickle), "{file}": str(other)}
    run = moeedge(*[names.get(a, a) for a in args])
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_a_reader_that_leaves_ends_the_command_quietly():
    """`moeedge run ... | head`: no error line when the pipe closes, as with any shell tool."""
    p = subprocess.Popen([sys.executable, "-m", "moeedge.cli", "run", "--prompt", "def f(x):", "--max-new-tokens",
                          "400", "--temperature", "0", "--memory-budget", "1GiB"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    assert p.wait(timeout=120) in (0, 141)  # 0 if it had finished writing before the pipe closed
    assert b"Broken pipe" not in p.stderr.read()
