"""moeedge aggregate: merged, averaged and pruned variants of tiny seeded decoder MoEs, read
back by moeedge.load. Calibration and evaluation run on a few hundred corpus tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeedge
from moeedge.aggregate.layer import Experts
from moeedge.aggregate.merge import alignment, permuted
from moeedge.aggregate.pipeline import aggregate
from moeedge.aggregate.targets import split_budget
from moeedge.cli import main
from moeedge.formats.errors import CheckpointError
from tiny_checkpoints import DECODERS, load_shards, make_decoder, write_tokenizer
from tiny_switch import make_switch

IDS = torch.randint(3, 160, (40,), generator=torch.Generator().manual_seed(11)).tolist()
E, LAYERS = 6, 3  # the tiny Mixtral's experts per layer and MoE layers
QUICK = dict(calibration_tokens=256, eval_tokens=0)


def checkpoint(directory: Path, family: str = "mixtral", edit=None) -> Path:
    """A tiny checkpoint with a tokenizer; edit(tensors) may rewrite its weights first."""
    directory.mkdir(parents=True, exist_ok=True)
    make_decoder(directory, family, seed=4)
    write_tokenizer(directory)
    if edit is not None:
        tensors = load_file(directory / "model.safetensors")
        edit(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def expert(layer: int, e: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"


def permuted_copy(tensors: dict, layer: int, src: int, dst: int, seed: int) -> None:
    """Expert dst := expert src with its intermediate neurons shuffled (the same function)."""
    perm = torch.randperm(tensors[expert(layer, src, "w1")].shape[0], generator=torch.Generator().manual_seed(seed))
    tensors[expert(layer, dst, "w1")] = tensors[expert(layer, src, "w1")][perm].clone()
    tensors[expert(layer, dst, "w3")] = tensors[expert(layer, src, "w3")][perm].clone()
    tensors[expert(layer, dst, "w2")] = tensors[expert(layer, src, "w2")][:, perm].clone()


def logits(directory: Path) -> torch.Tensor:
    with moeedge.load(directory, memory_budget="4GiB", max_context=64) as model:
        return model.logits(IDS)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Every layer's experts in pairs (0, 1), (2, 3), (4, 5), each pair one function with
    its neurons in two different orders."""
    def edit(tensors):
        for layer in range(LAYERS):
            for e in range(0, E, 2):
                permuted_copy(tensors, layer, e, e + 1, seed=10 * layer + e)

    return checkpoint(tmp_path_factory.mktemp("pairs"), edit=edit)


# -- alignment ---------------------------------------------------------------------------

def random_experts(n: int = 2, inter: int = 24, hidden: int = 16) -> Experts:
    g = torch.Generator().manual_seed(3)
    return Experts(torch.randn(n, inter, hidden, generator=g), torch.randn(n, inter, hidden, generator=g),
                   torch.randn(n, hidden, inter, generator=g))


def test_alignment_permutation_leaves_the_expert_function_unchanged():
    experts = random_experts()
    perm = alignment(experts, 0, 1)
    assert sorted(perm.tolist()) == list(range(24)) and perm.tolist() != list(range(24))
    moved = Experts(*(t[None] for t in permuted(experts, 1, perm)))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(moved.forward(0, x), experts.forward(1, x), atol=1e-5, rtol=1e-5)


def test_alignment_finds_the_permutation_that_relates_two_copies():
    experts = random_experts()
    shuffle = torch.randperm(24, generator=torch.Generator().manual_seed(8))
    copy = Experts(*(torch.stack([t[0], p]) for t, p in zip(
        (experts.gate, experts.up, experts.down),
        (experts.gate[0][shuffle], experts.up[0][shuffle], experts.down[0][:, shuffle]))))
    gate, up, down = permuted(copy, 1, alignment(copy, 0, 1))
    assert torch.equal(gate, experts.gate[0]) and torch.equal(up, experts.up[0]) and torch.equal(down, experts.down[0])


# -- variants through moeedge.load -------------------------------------------------------

@pytest.mark.parametrize("method", ["merge", "average", "prune"])
def test_all_experts_reproduce_the_source_exactly(source, tmp_path, method):
    meta = aggregate(source, method, tmp_path / "out", experts_per_layer=E, **QUICK)
    assert meta["expert_counts"] == [E] * LAYERS and meta["expert_bytes"] == meta["expert_bytes_source"]
    assert meta["expert_map"] == [list(range(E))] * LAYERS
    assert torch.equal(logits(tmp_path / "out"), logits(source))


@pytest.mark.parametrize("family", [f for f in DECODERS if f != "mixtral"])
def test_other_decoder_families_merge_and_reproduce_at_all_experts(tmp_path, family):
    src = checkpoint(tmp_path / "src", family)
    aggregate(src, "merge", tmp_path / "all", experts_per_layer=E, **QUICK)
    assert torch.equal(logits(tmp_path / "all"), logits(src))
    meta = aggregate(src, "merge", tmp_path / "half", experts_per_layer=3, **QUICK)
    assert meta["expert_counts"] == [3] * len(meta["expert_map"])
    assert torch.isfinite(logits(tmp_path / "half")).all()


def test_merging_clusters_of_identical_experts_is_lossless(pairs, tmp_path):
    meta = aggregate(pairs, "merge", tmp_path / "out", experts_per_layer=E // 2, **QUICK)
    assert meta["expert_map"] == [[0, 0, 1, 1, 2, 2]] * LAYERS
    assert max(meta["layer_error"]) < 1e-5
    torch.testing.assert_close(logits(tmp_path / "out"), logits(pairs), atol=2e-5, rtol=0)


def test_averaging_without_alignment_loses_what_merging_keeps(pairs, tmp_path):
    meta = aggregate(pairs, "average", tmp_path / "out", experts_per_layer=E // 2, **QUICK)
    assert meta["expert_map"] == [[0, 0, 1, 1, 2, 2]] * LAYERS  # the same clusters as merge's
    assert min(meta["layer_error"]) > 0.1
    assert (logits(tmp_path / "out") - logits(pairs)).abs().max() > 1e-3   # merge's is below 2e-5


@pytest.mark.parametrize("method", ["merge", "prune"])
def test_smaller_variants_load_run_and_report_sizes(source, tmp_path, method):
    out = tmp_path / "out"
    meta = aggregate(source, method, out, experts_per_layer=2, calibration_tokens=256, eval_tokens=200)
    assert meta["expert_bytes"] * 3 == meta["expert_bytes_source"]
    stored = load_shards(out)
    assert sum(".experts." in name for name in stored) == 3 * 2 * LAYERS
    with moeedge.load(out, memory_budget="4GiB", max_context=64, prefetch=False) as model:
        assert model.checkpoint.expert_nbytes == meta["expert_bytes"]
        assert torch.isfinite(model.logits(IDS)).all()
        assert len(list(model.stream_ids(IDS[:5], max_new_tokens=4, temperature=0))) <= 4
    q = meta["quality"]
    assert q["tokens"] > 100 and q["ppl_ratio"] > 0 and 0 <= q["top1_agreement"] <= 1 and q["kl_mean"] >= 0
    assert json.loads((out / "moeedge_variant.json").read_text())["quality"] == q


@pytest.mark.parametrize("method", ["merge", "prune"])
def test_variant_decodes_with_the_default_prefetcher(source, tmp_path, method):
    # the predictors guess router outputs; the prefetcher maps them to the stored experts
    aggregate(source, method, tmp_path / "out", experts_per_layer=1, **QUICK)
    with moeedge.load(tmp_path / "out", memory_budget="4GiB", max_context=64, prefetch=False) as model:
        expected = list(model.stream_ids(IDS[:5], max_new_tokens=8, temperature=0))
    with moeedge.load(tmp_path / "out", memory_budget="4GiB", max_context=64, prefetch=True) as model:
        model.cache.set_budget(3 * model.cache.store.slot_bytes(model.cache.store.keys()[0]))
        assert list(model.stream_ids(IDS[:5], max_new_tokens=8, temperature=0)) == expected
        assert model.stats()["prefetch_issued"] > 0


def test_a_predictor_file_beside_the_weights_is_not_read_as_a_shard(tmp_path):
    # moeedge_predictor.safetensors (moeedge predict) sits beside model.safetensors; variants copy it
    from moeedge.predict.bundle import FILENAME, train_bundle
    from moeedge.predict.metrics import RoutingTrace

    src = checkpoint(tmp_path / "src")
    g = torch.Generator().manual_seed(2)
    picks = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(64 * LAYERS)]).view(64, LAYERS, 2)
    trace = RoutingTrace(picks, torch.randn(64, LAYERS, 64, generator=g), [(0, 64)], E)
    train_bundle(trace, epochs=1).save(src / FILENAME)
    aggregate(src, "prune", tmp_path / "out", experts_per_layer=3, **QUICK)
    assert (tmp_path / "out" / FILENAME).is_file()
    assert "history.stored" not in load_shards(tmp_path / "out")
    with moeedge.load(tmp_path / "out", memory_budget="4GiB", max_context=64) as model:
        assert "history.stored" not in model.checkpoint.dense_names
        assert model.stats()["prediction"] and torch.isfinite(model.logits(IDS)).all()


@pytest.mark.parametrize("row, message", [
    ([0, 0, 1, 1, 2], "must be 6 integers"),
    ([0, 0, 1, 1, 3, 3], "each used"),
    ([0, 0, 1, 1, 2, -2], "or -1"),
])
def test_a_malformed_expert_map_is_refused_at_load(source, tmp_path, row, message):
    out = tmp_path / "out"
    aggregate(source, "merge", out, experts_per_layer=3, **QUICK)
    meta = json.loads((out / "moeedge_variant.json").read_text())
    meta["expert_map"][1] = row
    (out / "moeedge_variant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        moeedge.load(out)


def test_prune_keeps_the_most_used_experts_and_routes_around_the_rest(source, tmp_path):
    meta = aggregate(source, "prune", tmp_path / "out", experts_per_layer=3, **QUICK)
    for table in meta["expert_map"]:
        assert sorted(e for e in table if e >= 0) == [0, 1, 2] and table.count(-1) == 3
    # Fewer kept experts than top-k (2): every token runs on the one that is left.
    aggregate(source, "prune", tmp_path / "one", experts_per_layer=1, **QUICK)
    assert torch.isfinite(logits(tmp_path / "one")).all()


def test_expert_memory_splits_by_sensitivity(tmp_path):
    """Layer 1's experts are all one function: merging them costs nothing, so it gives up
    the most and the other layers keep more."""
    def edit(tensors):
        for e in range(1, E):
            permuted_copy(tensors, 1, 0, e, seed=e)

    src = checkpoint(tmp_path / "src", edit=edit)
    meta = aggregate(src, "merge", tmp_path / "out", expert_memory=0.5, **QUICK)
    counts = meta["expert_counts"]
    assert counts[1] == 1 and min(counts[0], counts[2]) > 1
    assert meta["expert_bytes"] <= 0.5 * meta["expert_bytes_source"]
    assert meta["sensitivity"][1][0] < 1e-4 < meta["sensitivity"][0][0]


def test_split_budget_removes_experts_where_error_grows_least():
    errors = [[0.9, 0.5, 0.2, 0.0], [0.1, 0.05, 0.02, 0.0]]   # layer 1 barely notices
    assert split_budget(errors, [10, 10], 50) == [4, 1]
    assert split_budget(errors, [10, 10], 80) == [4, 4]
    with pytest.raises(ValueError, match="one expert per layer"):
        split_budget(errors, [10, 10], 19)


# -- bad input -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, source) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "model.gguf").write_bytes(b"GGUF")
    make_switch(root / "switch")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    aggregate(source, "prune", root / "variant", experts_per_layer=4, **QUICK)
    (root / "full").mkdir()
    (root / "full" / "file").write_text("x")
    return {"gguf": root / "model.gguf", "switch": root / "switch", "llama": root / "llama",
            "variant": root / "variant", "full": root / "full"}


@pytest.mark.parametrize("args, message", [
    (["--method", "blend", "--experts-per-layer", "2"], "unknown method 'blend'"),
    (["--method", "merge", "--experts-per-layer", "0"], "between 1 and 6"),
    (["--method", "merge", "--experts-per-layer", "7"], "between 1 and 6"),
    (["--method", "merge", "--expert-memory", "0"], "in (0, 1]"),
    (["--method", "merge", "--expert-memory", "1.5"], "in (0, 1]"),
    (["--method", "merge", "--expert-memory", "0.1"], "one expert per layer already takes"),
    (["--method", "merge"], "one of the arguments --experts-per-layer --rank --expert-memory is required"),
    (["--method", "merge", "--experts-per-layer", "2", "--memory-budget", "lots"], "not a byte count: 'lots'"),
])
def test_bad_targets_exit_2_with_one_line(source, tmp_path, capsys, args, message):
    assert run_cli(["aggregate", str(source), *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def run_cli(argv: list[str]) -> int:
    """moeedge's exit status; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("which, message", [
    ("gguf", "GGUF files are not supported"),
    ("switch", "has no tokenizer.model: the corpus is encoded with"),
    ("llama", "model_type 'llama' is not supported"),
    ("variant", "an aggregated variant; aggregate its source instead"),
])
def test_unsupported_sources_exit_2_with_one_line(bad_sources, tmp_path, capsys, which, message):
    assert run_cli(["aggregate", str(bad_sources[which]), "--method", "merge", "--experts-per-layer", "2",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_output_directory_that_is_not_empty_is_refused(source, bad_sources, capsys):
    assert run_cli(["aggregate", str(source), "--method", "prune", "--experts-per-layer", "2",
                 "-o", str(bad_sources["full"])]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in bad_sources["full"].iterdir()] == ["file"]


def test_cli_prints_bytes_saved_and_quality(source, tmp_path, capsys):
    assert run_cli(["aggregate", str(source), "--method", "merge", "--experts-per-layer", "3",
                 "--calibration-tokens", "256", "--eval-tokens", "200", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "experts per layer [3, 3, 3]" in out and "(saved" in out and "50.0%" in out
    assert "perplexity" in out and "top-1 agreement" in out


@pytest.mark.parametrize("target", [dict(experts_per_layer=3), dict(expert_memory=0.6)])
def test_layers_are_read_one_at_a_time(source, tmp_path, monkeypatch, target):
    """A source's fp32 layer copies never pile up (Switch-Base-128's are 2.4 GB each): each is
    gone before the next is read."""
    import gc
    import weakref

    from moeedge.aggregate import pipeline

    refs, most = [], [0]

    def read_layer(*args):
        gc.collect()
        layer = real(*args)
        refs.append(weakref.ref(layer))
        most[0] = max(most[0], sum(r() is not None for r in refs))
        return layer

    real = pipeline.read_layer
    monkeypatch.setattr(pipeline, "read_layer", read_layer)
    meta = aggregate(source, "merge", tmp_path / "out", eval_tokens=0, **target)
    assert len(meta["expert_counts"]) == LAYERS
    assert most[0] == 1


def test_the_budget_covers_the_layer_being_aggregated(source):
    """The source model gets the budget less three fp32 copies of its largest layer's experts
    (and lowrank's SVD of them)."""
    from moeedge.aggregate.pipeline import source_budget
    from moeedge.formats.open import open_checkpoint

    ckpt = open_checkpoint(source)
    layer = E * ckpt.layer_expert_nbytes(0) * 4 // ckpt.expert_parts[0][0].dtype.itemsize
    assert source_budget(2 ** 30, ckpt) == 2 ** 30 - 3 * layer
    assert source_budget(layer, ckpt) == "min" and source_budget("min", ckpt) == "min"
    # lowrank also holds the float64 SVD of every expert matrix's difference from the base
    svd = sum(E * 8 * min(p.shape) * (sum(p.shape) + 1) for p in ckpt.expert_parts[0])
    widest = max(8 * (E * p.shape[0] * p.shape[1] + 4 * min(p.shape) ** 2 + 8 * min(p.shape) + max(p.shape))
                 for p in ckpt.expert_parts[0])  # one difference in float64, and LAPACK's workspace
    assert source_budget(2 ** 30, ckpt, "lowrank") == 2 ** 30 - 3 * layer - svd - widest
    # distillation also refines what the variant stores: 5 fp32 copies of it (weights,
    # gradients, Adam's moments, the best state); with 2 of E experts kept, 2/E of the layer
    from moeedge.aggregate.pipeline import stored_share
    share = stored_share(ckpt, "merge", 2, None)
    assert share == 2 / E and stored_share(ckpt, "merge", None, None) == 1.0
    assert source_budget(2 ** 30, ckpt, "merge", share) == 2 ** 30 - 3 * layer - int(5 * share * layer)
