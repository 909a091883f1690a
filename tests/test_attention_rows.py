"""Several sequences' decode tokens through a layer's attention block in one native call
(moeedge._core.AttentionStep.rows): each row, its KV write and its router logits are the bits
that its own step's call gives it (torch.equal, never allclose), for each decoder family, a
quantized GGUF and every kernel path; the runner's multi-sequence decode through it gives
each sequence the tokens and logits it gets alone; bad calls are refused, naming the problem."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf_fixtures as gf
import moeedge
from moeedge import _core
from moeedge.models.decoder import DecoderMoE
from tiny_checkpoints import DECODERS, make_decoder

POSITIONS = [0, 7, 3, 40]  # one row per KV slot, each at its own position


def checkpoint(tmp_path, case: str):
    if case == "q8_0_gguf":
        return gf.quantized_mixtral(tmp_path, "q8_0")[0]
    family, _, dtype = case.partition("-")
    make_decoder(tmp_path, family, seed=5, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return tmp_path


def separate_and_rows(runner, layer: int, h: torch.Tensor, positions: list[int], rope):
    """(h, x, logits, k and v caches) from one call per row, then from one rows call on the same
    caches as they were before: each a list of the two."""
    steps = [runner.steps[slot][layer] for slot in range(len(positions))]
    cos, sin = (t.reshape(len(positions), -1).contiguous() for t in rope)
    before = runner.k_cache.clone(), runner.v_cache.clone()
    experts = steps[0].router_rows
    results = []
    for together in (False, True):
        runner.k_cache.copy_(before[0])
        runner.v_cache.copy_(before[1])
        out_h, x = h.clone(), torch.empty_like(h)
        logits = torch.full((len(h), experts), float("nan"))  # NaN: any value not written differs
        if together:
            _core.AttentionStep.rows(steps, out_h.numpy(), positions, cos.numpy(), sin.numpy(), x.numpy(),
                                     logits.numpy() if experts else None)
        else:
            for i, (step, pos) in enumerate(zip(steps, positions)):
                step(out_h[i].numpy(), pos, cos[i].numpy(), sin[i].numpy(), x[i].numpy(),
                     logits[i].numpy() if experts else None)
        results.append((out_h, x, logits, runner.k_cache.clone(), runner.v_cache.clone()))
    return results


@pytest.mark.parametrize("case", [*DECODERS, "mixtral-bf16", "q8_0_gguf"])
def test_rows_are_the_bits_of_separate_calls(tmp_path, case):
    """Qwen2-MoE: q/k/v biases and a dense layer (no router); OLMoE: q/k norms and clip_qkv."""
    source = checkpoint(tmp_path, case)
    gen = torch.Generator().manual_seed(1)
    with moeedge.load(source, memory_budget="8GiB", max_context=64, n_sequences=len(POSITIONS)) as model:
        runner = model.runner
        runner.k_cache.copy_(torch.randn(runner.k_cache.shape, generator=gen))  # earlier positions' keys
        runner.v_cache.copy_(torch.randn(runner.v_cache.shape, generator=gen))
        rope = runner._rope(torch.tensor(POSITIONS))
        for layer in range(runner.cfg.n_layers):
            assert all(runner.steps[slot][layer] is not None for slot in range(len(POSITIONS)))
            h = torch.randn(len(POSITIONS), runner.cfg.hidden, generator=gen)
            (*alone, k1, v1), (*rows, k2, v2) = separate_and_rows(runner, layer, h, POSITIONS, rope)
            for what, a, b in zip(("h", "x", "logits"), alone, rows):
                assert torch.equal(a, b), f"layer {layer}: {what} differs from separate calls"
            assert torch.equal(k1, k2) and torch.equal(v1, v2), f"layer {layer}: the KV writes differ"


def weights(rng: np.random.Generator, hidden: int = 64, heads: int = 4, kv_heads: int = 2, d: int = 32,
            experts: int = 6) -> dict:
    out = {}
    for name, (rows, cols) in {"q": (heads * d, hidden), "k": (kv_heads * d, hidden), "v": (kv_heads * d, hidden),
                               "o": (hidden, heads * d), "router": (experts, hidden)}.items():
        out[name] = ("f32", rng.normal(0, 0.15, (rows, cols)).astype(np.float32), rows, cols, 0)
    for name, n in {"in_norm": hidden, "post_norm": hidden, "q_norm": heads * d, "k_norm": kv_heads * d,
                    "q_bias": heads * d, "k_bias": kv_heads * d, "v_bias": kv_heads * d}.items():
        out[name] = rng.normal(1.0 if "norm" in name else 0.0, 0.2, n).astype(np.float32)
    return out


def make_steps(w: dict, n: int, capacity: int, hidden: int = 64, heads: int = 4, kv_heads: int = 2, d: int = 32,
               seed: int = 0):
    rng = np.random.default_rng(seed)
    caches = [(rng.normal(0, 1, (capacity, kv_heads, d)).astype(np.float32),
               rng.normal(0, 1, (capacity, kv_heads, d)).astype(np.float32)) for _ in range(n)]
    return [_core.AttentionStep(hidden, heads, kv_heads, d, 1e-5, 0.5, w, k, v) for k, v in caches], caches


def rope(positions, d: int = 32):
    freqs = np.asarray(positions, np.float64)[:, None] / 10000.0 ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([freqs, freqs], axis=1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


# 1100 positions: each row's attention splits its heads across the kernel threads
@pytest.mark.parametrize("threads", [1, 0])
def test_rows_on_every_path_and_a_long_context(path, threads):
    w = weights(np.random.default_rng(2))
    positions = [1100, 2, 513]
    h = np.random.default_rng(3).normal(0, 1, (3, 64)).astype(np.float32)
    cos, sin = rope(positions)
    outs = []
    for together in (False, True):
        steps, caches = make_steps(w, 3, 1200)
        out_h, post, logits = h.copy(), np.empty_like(h), np.empty((3, 6), np.float32)
        if together:
            _core.AttentionStep.rows(steps, out_h, positions, cos, sin, post, logits, threads)
        else:
            for i, step in enumerate(steps):
                step(out_h[i], positions[i], cos[i], sin[i], post[i], logits[i], threads)
        outs.append((out_h, post, logits, *(c for pair in caches for c in pair)))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


def test_a_multi_sequence_decode_gives_each_sequence_its_tokens_alone(tmp_path, monkeypatch):
    """Four sequences at different positions decode greedily together (the rows call, one a
    layer) and each alone: the same tokens and logits, bit for bit; the per-sequence path
    (attention_rows off) gives the same bits too."""
    make_decoder(tmp_path, "olmoe", seed=6)
    prompts = [[3, 17, 42, 99, 5, 61, 7], [150, 33, 8], [21, 64, 2, 9, 11, 90, 14, 40, 77, 13, 6], [12, 5]]
    calls = []
    rows = DecoderMoE._attention_rows
    monkeypatch.setattr(DecoderMoE, "_attention_rows", lambda self, *a: calls.append(1) or rows(self, *a))

    def greedy(runner, batch: list[list[int]], steps: int = 5):
        seqs = [runner.new_sequence() for _ in batch]
        out = [runner.step([(s, torch.tensor(p))])[0][-1:] for s, p in zip(seqs, batch)]
        tokens, logits = [[] for _ in batch], [[o] for o in out]
        for _ in range(steps):
            for t, o in zip(tokens, out):
                t.append(int(o[-1].argmax()))
            out = runner.step([(s, torch.tensor(t[-1:])) for s, t in zip(seqs, tokens)])
            for got, o in zip(logits, out):
                got.append(o)
        for s in seqs:
            runner.free(s)
        return tokens, [torch.cat(g) for g in logits]

    with moeedge.load(tmp_path, memory_budget="8GiB", max_context=64, n_sequences=4) as model:
        runner = model.runner
        runner.free(model.sequence)
        alone = [greedy(runner, [p]) for p in prompts]
        assert not calls
        together = greedy(runner, prompts)
        assert len(calls) == 5 * runner.cfg.n_layers  # every decode step, every layer
        runner.attention_rows = False
        apart = greedy(runner, prompts)
        assert len(calls) == 5 * runner.cfg.n_layers
    for i, (tokens, logits) in enumerate(alone):
        assert together[0][i] == tokens[0] and apart[0][i] == tokens[0]
        assert torch.equal(together[1][i], logits[0]) and torch.equal(apart[1][i], logits[0])


# -- bad input ---------------------------------------------------------------------------
def call(steps, positions, h=None, logits=True, hidden=64):
    n = len(positions)
    h = np.ones((n, hidden), np.float32) if h is None else h
    cos, sin = rope(positions)
    _core.AttentionStep.rows(steps, h, positions, cos, sin, np.empty((n, hidden), np.float32),
                             np.empty((n, 6), np.float32) if logits else None)


def test_bad_rows_calls_name_the_problem_and_write_nothing():
    w = weights(np.random.default_rng(4))
    steps, caches = make_steps(w, 2, 8)
    before = [c.copy() for pair in caches for c in pair]
    with pytest.raises(ValueError, match="2 steps but 3 positions: one of each per row"):
        call(steps, [0, 1, 2])
    with pytest.raises(ValueError, match=r"h \(\[2 rows, 64\]\) has 120 values, 128 expected"):
        call(steps, [0, 1], h=np.ones((2, 60), np.float32))
    with pytest.raises(ValueError, match=r"h \(\[2 rows, 64\]\) has 192 values, 128 expected"):
        call(steps, [0, 1], h=np.ones((3, 64), np.float32))
    with pytest.raises(ValueError, match="rows needs one step per row, got none"):
        call([], [])
    with pytest.raises(ValueError, match="step 1 is None"):
        call([steps[0], None], [0, 1])
    with pytest.raises(ValueError, match="this layer has a router: logits are needed"):
        call(steps, [0, 1], logits=False)
    h = np.ones((2, 64), np.float32)
    with pytest.raises(IndexError, match="position 8 is past the KV cache's 8"):
        call(steps, [0, 8], h=h)
    assert np.array_equal(h, np.ones((2, 64), np.float32))
    assert all(np.array_equal(a, c) for a, c in zip(before, (c for pair in caches for c in pair)))


def test_steps_of_another_layer_or_model_are_refused():
    w = weights(np.random.default_rng(4))
    (a,), _ = make_steps(w, 1, 8)
    other = dict(w, k_norm=w["k_norm"] * 2)  # the same matrices, another k_norm
    (b,), _ = make_steps(other, 1, 8)
    with pytest.raises(ValueError, match="step 1's k_norm is not step 0's: the steps must be one layer's"):
        call([a, b], [0, 1])
    (c,), _ = make_steps(weights(np.random.default_rng(5)), 1, 8)  # another layer's weights
    with pytest.raises(ValueError, match="step 2's q_proj is not step 0's: the steps must be one layer's"):
        call([a, a, c], [0, 1, 2])
    (d,), _ = make_steps(weights(np.random.default_rng(6), hidden=32), 1, 8, hidden=32)
    with pytest.raises(ValueError, match=r"step 1 has hidden 32, 4 heads \(2 KV\) of 32, step 0 hidden 64, "
                                         r"4 heads \(2 KV\) of 32: the steps must be one layer's"):
        call([a, d], [0, 1])
