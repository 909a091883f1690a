"""bench/prefill_timeline.py: the child's events on the bundled default model (no cgroup), and
the table made from them: a row per MoE layer and the totals."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moeedge import _core
from moeedge.default_model import default_model_path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "prefill_timeline.py"


def load_script():
    spec = importlib.util.spec_from_file_location("prefill_timeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    """load(threads=N) sets the process's kernel and torch threads: put them back for the tests after."""
    torch_threads = torch.get_num_threads()
    yield
    _core.set_kernel_threads(0)
    torch.set_num_threads(torch_threads)


def test_the_timeline_has_a_row_per_layer_and_totals_that_add_up(capsys, restore_threads):
    timeline = load_script()
    args = argparse.Namespace(source=str(default_model_path()), limit=1 << 30, prompt_tokens=48, threads=1)
    timeline.child(args)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    events = out["events"]
    kinds = [e[0] for e in events]
    layers = len([k for k in kinds if k == "ffn"])
    assert kinds == ["start"] + ["ffn", "done"] * layers + ["token"] and layers == 4
    assert all(b[2] >= a[2] for a, b in zip(events, events[1:]))  # time runs forward
    assert any(name and user + system > 0 for name, user, system in out["threads"])
    table = timeline.table(events).splitlines()
    rows = [line for line in table if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == layers
    total = next(line for line in table if line.startswith("| all"))
    figures = [float(v) for v in total.strip("|").split("|")[1:]]
    attention, experts = figures[0], figures[1]
    prompt = float(table[-1].split()[1])
    assert 0 < attention + experts <= prompt + 1e-6
