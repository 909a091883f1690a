"""Switch Transformers with experts offloaded and a cache that holds one expert: logits
equal transformers' fully loaded model (fp32, max abs diff <= 1e-4), the tokens past an
expert's capacity are dropped exactly where transformers drops them, and greedy
decoding picks the same 32 tokens."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeedge._core import ExpertCache, ExpertStore
from moeedge.formats.errors import CheckpointError
from moeedge.formats.open import open_hf_directory
from moeedge.formats.switch_config import sparse_blocks
from moeedge.models import switch
from moeedge.models.runner import Prediction
from moeedge.models.switch import SwitchMoE
from moeedge.runtime.experts import ExpertAccess
from tiny_switch import make_switch

_G = torch.Generator().manual_seed(7)
IDS = torch.randint(3, 160, (24,), generator=_G)       # encoder input
DECODER_IDS = torch.randint(3, 160, (20,), generator=_G)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("switch")
    return directory, make_switch(directory)


def open_runner(directory, tight: bool = True, prefetch: bool = False, max_context: int = 64):
    """Checkpoint -> store -> cache -> SwitchMoE, as api.load does; tight: room for one expert."""
    ckpt = open_hf_directory(directory)
    store = ExpertStore(ckpt.files, ckpt.expert_ranges, direct_io=True)
    slot = max(store.slot_bytes(k) for k in store.keys())
    cache = ExpertCache(store, sum(store.slot_bytes(k) for k in store.keys()), "lru", 2)
    if tight:
        cache.set_budget(ckpt.config.top_k * slot)
    dtype = ckpt.expert_parts[0][0].dtype
    dense = {n: ckpt.read_dense(n).to(dtype) for n in ckpt.dense_names}
    prediction = Prediction(predictor="stale-gate" if prefetch else None, prefetch=prefetch)
    runner = SwitchMoE(ckpt.config, dense, ExpertAccess(cache, ckpt.expert_parts, dtype), max_context, dtype,
                       prediction)
    return runner, cache


def logits(runner: SwitchMoE, ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
    """[Td, V] logits of decoder_ids after ids, in a sequence of their own."""
    seq = runner.new_sequence()
    try:
        return runner.score(seq, ids, 0, decoder_ids)
    finally:
        runner.free(seq)


def reference_routing(model, ids, decoder_ids) -> list[torch.Tensor]:
    """Per MoE layer (encoder first, then decoder), transformers' expert per token, -1 where dropped."""
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.router")]
    got: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(_module, _inputs, outputs):
            dispatch = outputs[0][0]  # [T, E] one-hot, zero past capacity
            got[i] = torch.where(dispatch.any(-1), dispatch.argmax(-1), -1)
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            model(input_ids=ids[None], decoder_input_ids=decoder_ids[None])
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(routers))]


def greedy(runner: SwitchMoE, ids: torch.Tensor, steps: int) -> list[int]:
    seq = runner.new_sequence()
    runner.encode(seq, ids)
    tokens = [runner.cfg.decoder_start_token_id]
    for _ in range(steps):
        tokens.append(int(runner.step([(seq, torch.tensor(tokens[-1:]))])[0][-1].argmax()))
    runner.free(seq)
    return tokens[1:]


def test_config_and_layout(checkpoint):
    directory, reference = checkpoint
    ckpt = open_hf_directory(directory)
    cfg = ckpt.config
    assert (cfg.encoder_moe_blocks, cfg.decoder_moe_blocks, cfg.moe_layers, cfg.top_k) == ([1, 3], [1, 3], 4, 1)
    assert [p.role for p in ckpt.expert_parts[0]] == ["wi", "wo"]
    assert ckpt.expert_parts[3][0].shape == (96, 64) and ckpt.expert_parts[3][1].shape == (64, 96)
    assert len(ckpt.expert_ranges) == cfg.moe_layers * cfg.n_experts
    expert_numel = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    assert ckpt.dense_numel + expert_numel == sum(p.numel() for p in reference.parameters())  # tied: once


@pytest.mark.parametrize("n_layers,n_sparse", [(4, 2), (12, 3), (12, 6), (6, 6), (4, 0), (1, 0), (3, 5), (8, 3)])
def test_sparse_blocks_follow_transformers(n_layers, n_sparse):
    import transformers as tf

    cfg = tf.SwitchTransformersConfig(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_heads=2, num_experts=2,
                                      num_layers=n_layers, num_decoder_layers=n_layers,
                                      num_sparse_encoder_layers=n_sparse, num_sparse_decoder_layers=n_sparse)
    model = tf.SwitchTransformersModel(cfg)
    for stack in (model.encoder, model.decoder):
        assert sparse_blocks(n_layers, n_sparse) == [i for i, b in enumerate(stack.block) if b.is_sparse]


def test_logits_match_transformers_with_evictions(checkpoint):
    directory, reference = checkpoint
    with torch.no_grad():
        expected = reference(input_ids=IDS[None], decoder_input_ids=DECODER_IDS[None]).logits[0]
    runner, cache = open_runner(directory)
    with cache:
        got = logits(runner, IDS, DECODER_IDS)
        stats = cache.stats()
    assert got.shape == (len(DECODER_IDS), 160)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert stats["evictions"] > 0 and stats["misses"] > 0


def test_attention_in_query_chunks_matches(checkpoint, monkeypatch):
    directory, reference = checkpoint
    with torch.no_grad():
        expected = reference(input_ids=IDS[None], decoder_input_ids=DECODER_IDS[None]).logits[0]
    monkeypatch.setattr(switch, "ATTN_CHUNK", 5)  # 24 and 20 tokens: several chunks and a partial one
    runner, cache = open_runner(directory)
    with cache:
        torch.testing.assert_close(logits(runner, IDS, DECODER_IDS), expected, atol=1e-4, rtol=0)


def test_dropped_tokens_match_transformers(checkpoint):
    directory, reference = checkpoint
    expected = reference_routing(reference, IDS, DECODER_IDS)
    runner, cache = open_runner(directory)
    with cache:
        logits(runner, IDS, DECODER_IDS)
    assert len(runner.last_routing) == len(expected) == 4
    for got, want in zip(runner.last_routing, expected):
        assert torch.equal(got, want)
    dropped = [int((r == -1).sum()) for r in runner.last_routing]
    assert all(n > 0 for n in dropped), f"capacity 3 should drop tokens in every MoE layer: {dropped}"


def test_greedy_tokens_match_transformers(checkpoint):
    directory, reference = checkpoint
    with torch.no_grad():
        out = reference.generate(IDS[None], max_new_tokens=32, do_sample=False, eos_token_id=None)[0, 1:].tolist()
    runner, cache = open_runner(directory)
    with cache:
        got = greedy(runner, IDS, 32)
        stats = cache.stats()
    assert got == out
    assert len(set(out)) >= 5  # not a one-token loop: the comparison means something
    assert stats["evictions"] > 0


def test_incremental_decoding_matches_full_sequence(checkpoint):
    # One token at a time never exceeds a capacity of 3, so compare a prefix too short to drop.
    directory, _ = checkpoint
    short = DECODER_IDS[:3]
    runner, cache = open_runner(directory)
    with cache:
        full = logits(runner, IDS, short)
        seq = runner.new_sequence()
        runner.encode(seq, IDS)
        steps = torch.cat([runner.step([(seq, short[i:i + 1])])[0] for i in range(len(short))])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def test_logits_do_not_depend_on_cache_size_or_prefetch(checkpoint):
    directory, _ = checkpoint
    runner, cache = open_runner(directory, tight=False)
    with cache:
        roomy = logits(runner, IDS, DECODER_IDS)
        roomy_greedy = greedy(runner, IDS, 8)
    runner, cache = open_runner(directory, tight=True, prefetch=True)
    with cache:
        assert torch.equal(logits(runner, IDS, DECODER_IDS), roomy)
        assert greedy(runner, IDS, 8) == roomy_greedy


def test_decoding_before_encoding_is_an_error(checkpoint):
    runner, cache = open_runner(checkpoint[0])
    with cache, pytest.raises(RuntimeError, match="encode"):
        runner.step([(runner.new_sequence(), torch.tensor([0]))])


def test_context_overflow_is_an_error(checkpoint):
    runner, cache = open_runner(checkpoint[0], max_context=16)
    with cache, pytest.raises(ValueError, match="max_context=16"):
        runner.encode(runner.new_sequence(), IDS)


# -- bad checkpoints -------------------------------------------------------------------

def rewrite(tmp_path, source, edit):
    """Copy the checkpoint with edit(tensors) applied to its tensors."""
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    return tmp_path


def test_missing_expert_tensor(checkpoint, tmp_path):
    name = "decoder.block.3.layer.2.mlp.experts.expert_5.wi.weight"
    directory = rewrite(tmp_path, checkpoint[0], lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"expert tensor '{name}' is missing"):
        open_hf_directory(directory)


def test_expert_shape_mismatch(checkpoint, tmp_path):
    name = "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"
    directory = rewrite(tmp_path, checkpoint[0], lambda t: t.update({name: torch.zeros(64, 95)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[64, 95\], config.json implies \[64, 96\]"):
        open_hf_directory(directory)


def test_missing_dense_tensor(checkpoint, tmp_path):
    name = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    directory = rewrite(tmp_path, checkpoint[0], lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        open_hf_directory(directory)


def test_router_shape_mismatch(checkpoint, tmp_path):
    name = "encoder.block.3.layer.1.mlp.router.classifier.weight"
    directory = rewrite(tmp_path, checkpoint[0], lambda t: t.update({name: torch.zeros(7, 64)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[7, 64\]"):
        open_hf_directory(directory)


def test_unsupported_activation(checkpoint, tmp_path):
    directory = rewrite(tmp_path, checkpoint[0], lambda t: None)
    raw = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**raw, "dense_act_fn": "gated-gelu"}))
    with pytest.raises(CheckpointError, match="dense_act_fn 'gated-gelu' is not supported"):
        open_hf_directory(directory)
