"""The quality-against-memory curve (moeedge.aggregate.curve): its points and its plot."""
from __future__ import annotations

import json

from moeedge.aggregate.curve import main, measure, plot


def test_unreachable_levels_are_refused_and_the_source_is_the_reference(tmp_path):
    points = measure(None, ["prune"], [1.0, 0.05], 256, tmp_path / "work")  # the bundled model
    assert points[0] == {"method": "prune", "level": 1.0, "share": 1.0, "ppl_ratio": 1.0,
                         "top1_agreement": 1.0, "kl_mean": 0.0}
    assert "one expert per layer already takes" in points[1]["refused"]


def test_distillation_is_named_with_its_start(tmp_path, monkeypatch):
    from moeedge.aggregate import pipeline

    calls = []

    def fake(source, method, out, **kwargs):  # the real one: tests/test_aggregate_distill.py
        calls.append((method, kwargs["distill_from"], kwargs["expert_memory"]))
        return {"expert_bytes": 50, "expert_bytes_source": 100,
                "quality": {"ppl_ratio": 1.01, "top1_agreement": 0.97, "kl_mean": 0.01}}

    monkeypatch.setattr(pipeline, "aggregate", fake)
    points = measure(None, ["distill:lowrank", "merge"], [0.5], 64, tmp_path / "work")
    assert calls == [("distill", "lowrank", 0.5), ("merge", None, 0.5)]
    assert points[0]["method"] == "distill:lowrank" and points[0]["share"] == 0.5


def test_plot_draws_every_method(tmp_path):
    points = [{"method": m, "level": lv, "share": lv, "ppl_ratio": 1 + (1 - lv) * k, "top1_agreement": lv,
               "kl_mean": 0.0} for k, m in enumerate(("prune", "lowrank"), 1) for lv in (1.0, 0.5, 0.25)]
    points.append({"method": "prune", "level": 0.05, "refused": "too small"})
    plot(points, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_json_and_png(tmp_path):
    assert main(["--methods", "prune", "--levels", "1.0,0.05", "-o", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "curve.json").read_text())) == 2
    assert (tmp_path / "curve.png").is_file() and not (tmp_path / "work").exists()
