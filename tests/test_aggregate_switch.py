"""moeedge aggregate and moeedge eval on Switch Transformers checkpoints: tiny seeded
encoder-decoder checkpoints written here (safetensors, no transformers), with a small
sentencepiece tokenizer trained on a few corpus files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeedge
from moeedge.aggregate.layer import SwitchExperts
from moeedge.aggregate.merge import permuted
from moeedge.aggregate.pipeline import aggregate
from moeedge.default_model import default_model_path
from moeedge.evaluate import _corpus
from moeedge.formats.switch_checkpoint import expected_dense
from moeedge.formats.switch_config import switch_config
from moeedge.data.span_corruption import train_tokenizer
from test_aggregate import run_cli

pytest.importorskip("sentencepiece")

VOCAB, E, LAYERS, HIDDEN, FF = 512, 8, 4, 32, 48  # 2 sparse blocks per stack
CONFIG = dict(model_type="switch_transformers", vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FF, num_heads=4,
              num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
              num_experts=E, expert_capacity=6, relative_attention_num_buckets=8, relative_attention_max_distance=20,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dense_act_fn="relu", dtype="float32",
              tie_word_embeddings=True)
QUICK = dict(calibration_tokens=128, eval_tokens=0, window=32)
IDS = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(11)).tolist()
DECODER_IDS = [0] + IDS[:15]


def expert(layer: int, e: int, w: str) -> str:
    stack, block = [("encoder", 1), ("encoder", 3), ("decoder", 1), ("decoder", 3)][layer]
    return f"{stack}.block.{block}.layer.{1 if stack == 'encoder' else 2}.mlp.experts.expert_{e}.{w}.weight"


def write_switch(directory: Path, tokenizer: Path, edit=None, **overrides) -> Path:
    """A seeded Switch checkpoint with every tensor the runner reads; edit(tensors) may rewrite it."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = {**CONFIG, **overrides}
    cfg = switch_config(raw, directory / "config.json")
    g = torch.Generator().manual_seed(4)
    shapes = {**expected_dense(cfg), "shared.weight": (cfg.vocab, cfg.hidden)}
    for layer in range(LAYERS):
        for e in range(cfg.n_experts):
            shapes[expert(layer, e, "wi")] = (cfg.ff, cfg.hidden)
            shapes[expert(layer, e, "wo")] = (cfg.hidden, cfg.ff)
    tensors = {name: torch.randn(shape, generator=g) * (1.0 if "norm" in name else 0.3)
               for name, shape in sorted(shapes.items())}
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(raw))
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return directory


def logits(directory: Path) -> torch.Tensor:
    with moeedge.load(directory, memory_budget="4GiB", max_context=64) as model:
        return model.logits(IDS, DECODER_IDS)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    train_tokenizer(_corpus().texts("train")[:6], VOCAB, 16, path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer) -> Path:
    return write_switch(tmp_path_factory.mktemp("switch"), tokenizer)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, source) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pruned") / "out"
    return out, aggregate(source, "prune", out, experts_per_layer=3, **QUICK)


# -- exactness -----------------------------------------------------------------------------

def test_merge_keeping_every_expert_is_the_source(source, tmp_path):
    meta = aggregate(source, "merge", tmp_path / "out", experts_per_layer=E, **QUICK)
    assert meta["expert_map"] == [list(range(E))] * LAYERS and meta["layer_error"] == [0.0] * LAYERS
    assert torch.equal(logits(tmp_path / "out"), logits(source))


def test_full_rank_lowrank_is_lossless(source, tmp_path):
    meta = aggregate(source, "lowrank", tmp_path / "out", rank=HIDDEN, **QUICK)
    assert meta["ranks"] == [HIDDEN] * LAYERS and meta["base_bytes"] > 0
    torch.testing.assert_close(logits(tmp_path / "out"), logits(source), atol=1e-5, rtol=0)


def test_rank_zero_is_every_expert_merged_into_the_usage_weighted_base(source, tmp_path):
    meta = aggregate(source, "lowrank", tmp_path / "out", rank=0, **QUICK)
    assert meta["expert_counts"] == [1] * LAYERS and meta["base_bytes"] == 0
    src = load_file(source / "model.safetensors")
    merged = tmp_path / "merged"   # the source with every expert replaced by its layer's weighted mean
    shutil.copytree(source, merged)
    for layer, weights in enumerate(meta["base_weights"]):
        assert len(set(weights)) > 1   # by usage, not equal shares
        for w in ("wi", "wo"):
            mean = sum(s * src[expert(layer, e, w)] for e, s in enumerate(weights))
            for e in range(E):
                src[expert(layer, e, w)] = mean.clone()
    save_file(src, merged / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(logits(tmp_path / "out"), logits(merged), atol=1e-5, rtol=0)


def test_neuron_permutation_leaves_an_expert_unchanged():
    g = torch.Generator().manual_seed(0)
    experts = SwitchExperts(torch.randn(2, FF, HIDDEN, generator=g), torch.randn(2, HIDDEN, FF, generator=g))
    perm = torch.randperm(FF, generator=g)
    moved = experts.like(t[None] for t in permuted(experts, 1, perm))
    x = torch.randn(10, HIDDEN, generator=g)
    torch.testing.assert_close(moved.forward(0, x), experts.forward(1, x))
    assert not torch.equal(moved.wi[0], experts.wi[1])


def test_merge_aligns_a_permuted_copy_losslessly(tokenizer, tmp_path):
    """Expert 1 of every layer is expert 0 with its neurons shuffled: merging them into one
    (the first join, at distance 0) must leave the model's function unchanged."""
    def edit(tensors):
        for layer in range(LAYERS):
            perm = torch.randperm(FF, generator=torch.Generator().manual_seed(layer))
            tensors[expert(layer, 1, "wi")] = tensors[expert(layer, 0, "wi")][perm].clone()
            tensors[expert(layer, 1, "wo")] = tensors[expert(layer, 0, "wo")][:, perm].clone()

    src = write_switch(tmp_path / "src", tokenizer, edit)
    meta = aggregate(src, "merge", tmp_path / "merge", experts_per_layer=E - 1, **QUICK)
    assert all(row[0] == row[1] for row in meta["expert_map"]) and max(meta["layer_error"]) < 1e-5
    torch.testing.assert_close(logits(tmp_path / "merge"), logits(src), atol=1e-4, rtol=0)
    aggregate(src, "average", tmp_path / "average", experts_per_layer=E - 1, **QUICK)
    assert (logits(tmp_path / "average") - logits(src)).abs().max() > 1e-3   # unaligned: not the same


def test_pruned_experts_are_never_routed(pruned):
    """Each token goes to the kept expert its router scores highest, even where the source
    would have picked a dropped one."""
    out, meta = pruned
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))   # within every expert's capacity
    picked_dropped = False
    with moeedge.load(out, memory_budget="4GiB", max_context=64) as model:
        for layer, row in enumerate(meta["expert_map"]):
            table = torch.tensor(row)
            scores = x @ model.runner.routers[layer][0].T                               # [T, E]
            best_kept = scores.masked_fill(table < 0, float("-inf")).argmax(-1)
            stored, _ = model.runner.route(x, layer)
            assert stored.tolist() == table[best_kept].tolist() and (stored >= 0).all()
            picked_dropped |= bool((table[scores.argmax(-1)] < 0).any())
    assert picked_dropped


def test_variant_loads_and_generates(pruned):
    with moeedge.load(pruned[0], memory_budget="4GiB", max_context=64) as model:
        assert [len(model.checkpoint.expert_ranges)] == [3 * LAYERS]
        ids = list(model.stream_ids(IDS[:12], max_new_tokens=6, temperature=0))
        assert 1 <= len(ids) <= 6 and all(0 <= i < VOCAB for i in ids)


# -- eval ------------------------------------------------------------------------------------

def test_eval_json_has_span_and_comparison_figures(source, pruned, capsys):
    assert run_cli(["eval", str(pruned[0]), "--reference", str(source), "--tokens", "128", "--window", "32",
                    "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    keys = {"ppl", "ppl_reference", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "expert_bytes",
            "expert_bytes_reference", "span_loss", "span_accuracy", "span_loss_reference", "span_accuracy_reference"}
    assert keys <= set(q) and q["windows"] == 4
    assert q["expert_bytes"] * E == q["expert_bytes_reference"] * 3 and q["kl_mean"] > 0
    assert q["ppl_ratio"] == pytest.approx(torch.tensor(q["span_loss"] - q["span_loss_reference"]).exp().item())


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tokenizer, source, pruned) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    write_switch(root / "wider", tokenizer, d_ff=2 * FF)
    (root / "no-spm").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(source / name, root / "no-spm" / name)
    return {"decoder": Path(default_model_path()), "wider": root / "wider", "no-spm": root / "no-spm",
            "variant": pruned[0]}


@pytest.mark.parametrize("reference, message", [
    ("decoder", "is an encoder-decoder (Switch) model and --reference"),
    ("wider", "different configurations (ff 48 vs 96)"),
])
def test_eval_against_an_incomparable_reference_exits_2(source, bad, capsys, reference, message):
    assert run_cli(["eval", str(source), "--reference", str(bad[reference]), "--tokens", "64", "--window",
                    "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("which, message", [
    ("variant", "an aggregated variant; aggregate its source instead"),
    ("no-spm", "has no tokenizer.model"),
])
def test_unusable_switch_sources_exit_2(bad, tmp_path, capsys, which, message):
    assert run_cli(["aggregate", str(bad[which]), "--method", "merge", "--experts-per-layer", "2",
                    "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()
