"""moeedge aggregate --method lowrank: a resident base per MoE layer plus per-expert low-rank
factors, read back by moeedge.load, which computes base(x) + b (a x) from the factors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeedge
from moeedge.aggregate.pipeline import aggregate
from moeedge.aggregate.targets import choose_levels
from moeedge.formats.open import open_checkpoint
from moeedge.formats.errors import CheckpointError
from moeedge.info import describe
from test_aggregate import E, IDS, LAYERS, QUICK, checkpoint, expert, logits, run_cli
from tiny_checkpoints import DECODERS, load_shards

HIDDEN, INTER = 64, 96  # the tiny Mixtral's; full rank is the smaller


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("source"))


def test_full_rank_is_lossless(source, tmp_path):
    meta = aggregate(source, "lowrank", tmp_path / "out", rank=HIDDEN, **QUICK)
    assert meta["ranks"] == [HIDDEN] * LAYERS and max(meta["layer_error"]) < 1e-5
    torch.testing.assert_close(logits(tmp_path / "out"), logits(source), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", [f for f in DECODERS if f != "mixtral"])
def test_other_decoder_families_are_lossless_at_full_rank(tmp_path, family):
    src = checkpoint(tmp_path / "src", family)
    cfg = open_checkpoint(src).config
    full = min(cfg.hidden, cfg.expert_intermediate)
    aggregate(src, "lowrank", tmp_path / "out", rank=full, **QUICK)
    torch.testing.assert_close(logits(tmp_path / "out"), logits(src), atol=1e-5, rtol=0)


def test_rank_zero_is_every_expert_merged_into_the_usage_weighted_base(source, tmp_path):
    meta = aggregate(source, "lowrank", tmp_path / "out", rank=0, **QUICK)
    assert meta["expert_map"] == [[0] * E] * LAYERS and meta["expert_counts"] == [1] * LAYERS
    assert meta["base_bytes"] == 0 and meta["expert_bytes"] * E == meta["expert_bytes_source"]
    src = load_file(source / "model.safetensors")
    stored = load_shards(tmp_path / "out")
    merged = tmp_path / "merged"   # the source with every expert replaced by its layer's weighted mean
    shutil.copytree(source, merged)
    for layer, weights in enumerate(meta["base_weights"]):
        assert sum(weights) == pytest.approx(1) and len(set(weights)) > 1   # by usage, not equal shares
        for w in ("w1", "w2", "w3"):
            mean = sum(s * src[expert(layer, e, w)] for e, s in enumerate(weights))
            torch.testing.assert_close(stored[expert(layer, 0, w)], mean, atol=1e-6, rtol=0)
            for e in range(E):
                src[expert(layer, e, w)] = mean.clone()
    save_file(src, merged / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(logits(tmp_path / "out"), logits(merged), atol=1e-5, rtol=0)


def test_the_base_is_resident_and_only_the_factors_are_expert_bytes(source, tmp_path):
    out, rank = tmp_path / "out", 8
    meta = aggregate(source, "lowrank", out, rank=rank, calibration_tokens=256, eval_tokens=200)
    factors = E * LAYERS * rank * 3 * (INTER + HIDDEN) * 4   # fp32
    assert meta["expert_bytes"] == factors and meta["base_bytes"] * E == meta["expert_bytes_source"]
    assert meta["quality"]["expert_bytes"] == factors
    assert json.loads(describe(out, 64, json_out=True))["expert_bytes"] == factors
    with moeedge.load(out, memory_budget="4GiB", max_context=64, prefetch=True) as model:
        ckpt = model.checkpoint
        assert ckpt.expert_nbytes == factors
        roles = {p.role: p.shape for p in ckpt.expert_parts[0]}
        assert roles == {"gate_a": (rank, HIDDEN), "gate_b": (INTER, rank), "up_a": (rank, HIDDEN),
                         "up_b": (INTER, rank), "down_a": (rank, INTER), "down_b": (HIDDEN, rank)}
        assert "model.layers.0.block_sparse_moe.experts.base.w1.weight" in ckpt.dense_names
        model.cache.set_budget(3 * model.cache.store.slot_bytes(model.cache.store.keys()[0]))
        assert len(list(model.stream_ids(IDS[:5], max_new_tokens=8, temperature=0))) <= 8
        assert model.stats()["prefetch_issued"] > 0


def test_the_runtime_computes_what_the_factors_stand_for(source, tmp_path):
    """base(x) + b (a x) at run time equals the expert base + b @ a written out in full."""
    aggregate(source, "lowrank", tmp_path / "out", rank=8, **QUICK)
    stored = load_shards(tmp_path / "out")
    formed = load_file(source / "model.safetensors")
    for layer in range(LAYERS):
        for w in ("w1", "w2", "w3"):
            base = stored[expert(layer, "base", w)]
            for e in range(E):
                a, b = (stored[expert(layer, e, f"{w}.{f}")] for f in ("lora_A", "lora_B"))
                formed[expert(layer, e, w)] = base + b @ a
    dense = tmp_path / "dense"
    shutil.copytree(source, dense)
    save_file(formed, dense / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(logits(tmp_path / "out"), logits(dense), atol=1e-5, rtol=0)
    assert (logits(tmp_path / "out") - logits(source)).abs().max() > 1e-4   # and rank 8 is not lossless


def test_expert_memory_chooses_each_layers_rank_by_sensitivity(tmp_path):
    """Layer 1's experts are identical copies: their differences from the base are zero, so
    rank 0 costs it nothing and the other layers keep the budget for their factors."""
    def edit(tensors):
        for e in range(1, E):
            for w in ("w1", "w2", "w3"):
                tensors[expert(1, e, w)] = tensors[expert(1, 0, w)].clone()

    src = checkpoint(tmp_path / "src", edit=edit)
    meta = aggregate(src, "lowrank", tmp_path / "out", expert_memory=0.5, **QUICK)
    assert meta["ranks"][1] == 0 and max(meta["ranks"][0], meta["ranks"][2]) > 0
    assert meta["expert_counts"][1] == 1 and meta["expert_map"][1] == [0] * E
    assert meta["expert_bytes"] + meta["base_bytes"] <= 0.5 * meta["expert_bytes_source"]
    assert meta["sensitivity"][1][0] < 1e-5 < meta["sensitivity"][0][0]
    with moeedge.load(tmp_path / "out", memory_budget="4GiB", max_context=64) as model:   # mixed layers
        assert model.checkpoint.expert_nbytes == meta["expert_bytes"]
        assert torch.isfinite(model.logits(IDS)).all()


def test_a_lowrank_layer_must_store_every_expert(source, tmp_path):
    out = tmp_path / "out"
    aggregate(source, "lowrank", out, rank=4, **QUICK)
    meta = json.loads((out / "moeedge_variant.json").read_text())
    meta["expert_map"][0] = [0, 0, 1, 2, 3, 4]   # stored experts 0..4 of the 6 it has
    (out / "moeedge_variant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="a low-rank layer stores every expert"):
        moeedge.load(out)


@pytest.mark.parametrize("args, message", [
    (["--method", "lowrank", "--rank", "-1"], "--rank must be between 0 and 64"),
    (["--method", "lowrank", "--rank", "65"], "--rank must be between 0 and 64"),
    (["--method", "merge", "--rank", "8"], "--rank is a target of lowrank and distill --from lowrank only"),
    (["--method", "prune", "--rank", "8"], "--rank is a target of lowrank and distill --from lowrank only"),
    (["--method", "distill", "--from", "merge", "--rank", "8"], "--rank is a target of lowrank"),
    (["--method", "lowrank", "--experts-per-layer", "2"], "--experts-per-layer is not a target of lowrank"),
    (["--method", "lowrank", "--rank", "4", "--experts-per-layer", "2"], "not allowed with argument"),
    (["--method", "lowrank", "--expert-memory", "0.1"], "one expert per layer already takes"),
])
def test_bad_lowrank_targets_exit_2_with_one_line(source, tmp_path, capsys, args, message):
    assert run_cli(["aggregate", str(source), *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_prints_resident_and_offloaded_bytes(source, tmp_path, capsys):
    assert run_cli(["aggregate", str(source), "--method", "lowrank", "--rank", "8", "--calibration-tokens", "256",
                    "--eval-tokens", "200", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "ranks [8, 8, 8]" in out and "resident bases" in out and "offloaded factors" in out
    assert "top-1 agreement" in out


def test_choose_levels_steps_down_where_error_grows_least_per_byte():
    errors = [[1.0, 0.5, 0.0], [0.2, 0.1, 0.0]]            # e.g. ranks 0, 8, 16 of two layers
    level_bytes = [[10, 30, 50], [10, 30, 50]]
    assert choose_levels(errors, level_bytes, 60) == [2, 0]
    assert choose_levels(errors, level_bytes, 100) == [2, 2]
    with pytest.raises(ValueError, match="smallest level of every layer"):
        choose_levels(errors, level_bytes, 19)
