"""bench/prefill_timeline.py: the child's events on the bundled default model (no cgroup), and
the table made from them: a row per MoE layer and the totals."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from moeedge.default_model import default_model_path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "prefill_timeline.py"


def load_script():
    spec = importlib.util.spec_from_file_location("prefill_timeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert any(line.startswith("| all") for line in table)
    # the sums from the events themselves: the table's figures are rounded to 10 ms
    spans = [timeline.span(*trio) for trio in zip(events[:-1:2], events[1:-1:2], events[2::2])]
    attention_and_experts = sum(figures[0] + figures[1] for figures in spans)
    assert 0 < attention_and_experts <= events[-1][2] - events[0][2]
