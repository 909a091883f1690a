"""moeedge aggregate --method distill: a merged or low-rank variant fitted to the source
layer's output on training-corpus calibration states, measured on held-out windows."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeedge.aggregate import distill, lowrank
from moeedge.aggregate.calibration import LayerCalibration, held_out_tokens
from moeedge.aggregate.layer import Experts, LowRank, MoeLayer, Variant
from moeedge.aggregate.pipeline import aggregate
from test_aggregate import LAYERS, checkpoint, logits, run_cli

QUICK = dict(calibration_tokens=512, window=64, eval_tokens=0)   # 8 windows: 2 held out


@pytest.fixture(autouse=True)
def short_refinement(monkeypatch):
    monkeypatch.setattr(distill, "STEPS", 60)
    monkeypatch.setattr(distill, "CHECK_EVERY", 20)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("source"))


def synthetic_layer(n_tokens: int = 800, n: int = 4, inter: int = 12, hidden: int = 8) -> MoeLayer:
    g = torch.Generator().manual_seed(5)
    experts = Experts(torch.randn(n, inter, hidden, generator=g), torch.randn(n, inter, hidden, generator=g),
                      torch.randn(n, hidden, inter, generator=g))
    cal = LayerCalibration(torch.randn(n_tokens, hidden, generator=g), torch.ones(n, dtype=torch.long),
                           torch.ones(n, dtype=torch.float64), held_out_tokens([100] * (n_tokens // 100)))
    return MoeLayer(0, experts, torch.randn(n, hidden, generator=g), 2, True, torch.float32, cal)


# -- the closed-form step ----------------------------------------------------------------

def test_least_squares_recovers_the_down_weights_of_a_plain_variant():
    layer = synthetic_layer()
    src = layer.experts
    start = Variant(list(range(4)), Experts(src.gate, src.up, torch.zeros_like(src.down)))  # down lost
    fit, held = (torch.where(m)[0] for m in (~layer.calibration.held_out, layer.calibration.held_out))
    solved, ridge = distill.least_squares(layer, start, fit, held)
    assert ridge is not None and layer.relative_error(start, held) == pytest.approx(1)
    assert layer.relative_error(solved, held) < 1e-3
    torch.testing.assert_close(solved.experts.down, src.down, atol=1e-2, rtol=0)


def test_least_squares_recovers_the_base_and_factors_of_a_lowrank_down_weight():
    layer = synthetic_layer()
    full = lowrank.build(layer, lowrank.max_rank(layer))
    lr = full.lowrank
    start = distill.lowrank_variant(full.table, LowRank((*lr.base[:2], torch.zeros_like(lr.base[2])), lr.a,
                                                         (*lr.b[:2], torch.zeros_like(lr.b[2]))))
    fit, held = (torch.where(m)[0] for m in (~layer.calibration.held_out, layer.calibration.held_out))
    solved, _ = distill.least_squares(layer, start, fit, held)
    assert layer.relative_error(start, held) > 0.5 and layer.relative_error(solved, held) < 1e-3


def test_refinement_fits_what_least_squares_cannot_and_is_kept_only_if_it_helps(monkeypatch):
    layer = synthetic_layer()
    src = layer.experts
    noisy = Experts(src.gate + 0.3 * torch.randn(src.gate.shape, generator=torch.Generator().manual_seed(1)),
                    src.up, src.down)
    start = distill.distill(layer, Variant(list(range(4)), noisy))
    r = start.report
    assert r["refine_steps"] > 0 and r["held_out_error_after"] < 0.95 * r["held_out_error_lstsq"]
    monkeypatch.setattr(distill, "LR", 0.0)   # a refinement that cannot help is dropped
    assert distill.distill(layer, Variant(list(range(4)), noisy)).report["refine_steps"] == 0


def test_held_out_tokens_are_whole_windows():
    assert held_out_tokens([2, 3, 1, 2, 2]).tolist() == [False] * 6 + [True, True, False, False]
    assert held_out_tokens([8]).tolist() == [False] * 6 + [True, True]   # too few windows: the last quarter


# -- variants through moeedge.load -------------------------------------------------------

@pytest.mark.parametrize("start, target", [("merge", {"experts_per_layer": 3}), ("lowrank", {"rank": 8})])
def test_distilling_lowers_the_held_out_layer_error_and_loads(source, tmp_path, start, target):
    ref = aggregate(source, start, tmp_path / "start", **target, **QUICK)
    meta = aggregate(source, "distill", tmp_path / "out", distill_from=start, **target, **QUICK)
    d = meta["distill"]
    assert d["from"] == start and d["held_out_tokens"] > 0 and meta["calibration"]["split"] == "train"
    assert d["fitted_tokens"] + d["held_out_tokens"] == meta["calibration"]["tokens"]
    for before, lstsq, after in zip(d["held_out_error_before"], d["held_out_error_lstsq"], d["held_out_error_after"]):
        assert after <= lstsq <= before
    assert sum(d["held_out_error_after"]) < 0.9 * sum(d["held_out_error_before"])
    # the same stored shapes and bytes as the variant it started from
    for key in ("expert_counts", "expert_map", "expert_bytes", "base_bytes"):
        assert meta[key] == ref[key]
    assert meta.get("ranks") == ref.get("ranks")
    out = logits(tmp_path / "out")
    assert torch.isfinite(out).all() and not torch.equal(out, logits(tmp_path / "start"))


def test_distill_splits_a_memory_target_by_its_starting_methods_sensitivity(source, tmp_path):
    meta = aggregate(source, "distill", tmp_path / "out", distill_from="lowrank", expert_memory=0.5, **QUICK)
    assert len(meta["ranks"]) == LAYERS and meta["sensitivity_ranks"] is not None
    assert meta["expert_bytes"] + meta["base_bytes"] <= 0.5 * meta["expert_bytes_source"]
    assert torch.isfinite(logits(tmp_path / "out")).all()


@pytest.mark.parametrize("args, message", [
    (["--method", "distill", "--experts-per-layer", "2"], "give --from merge or --from lowrank"),
    (["--method", "distill", "--from", "prune", "--experts-per-layer", "2"], "(got 'prune')"),
    (["--method", "merge", "--from", "lowrank", "--experts-per-layer", "2"], "--from is for --method distill"),
    (["--method", "distill", "--from", "lowrank", "--experts-per-layer", "2"], "not a target of lowrank"),
    (["--method", "distill", "--from", "lowrank", "--rank", "99"], "--rank must be between 0 and 64"),
])
def test_bad_distill_input_exits_2_with_one_line(source, tmp_path, capsys, args, message):
    assert run_cli(["aggregate", str(source), *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_layer_errors_before_and_after(source, tmp_path, capsys):
    assert run_cli(["aggregate", str(source), "--method", "distill", "--from", "merge", "--experts-per-layer", "3",
                    "--calibration-tokens", "256", "--eval-tokens", "200", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "distill from merge" in out and "held-out calibration tokens" in out and " -> " in out
    assert "top-1 agreement" in out
