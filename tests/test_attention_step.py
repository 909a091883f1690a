"""The native one-token attention block (moeedge._core.AttentionStep): against a float64
numpy reference with every option (grouped heads, biases, q/k norms, clamp, a router) on
every SIMD path, short and long contexts; each weight format; each decoder family's decode
against the torch path; and the errors bad shapes and buffers get."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf_fixtures as gf
import moeedge
from moeedge import _core
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.models.decoder import DecoderMoE
from tiny_checkpoints import DECODERS, make_decoder

HIDDEN, HEADS, KV_HEADS, D, EXPERTS, EPS = 64, 4, 2, 32, 6, 1e-5


def layer(rng: np.random.Generator, fmt: str = "f32", extras: bool = True) -> tuple[dict, dict]:
    """(the weights AttentionStep takes, the same as float64 arrays)."""
    shapes = {"q": (HEADS * D, HIDDEN), "k": (KV_HEADS * D, HIDDEN), "v": (KV_HEADS * D, HIDDEN),
              "o": (HIDDEN, HEADS * D), "router": (EXPERTS, HIDDEN)}
    given, exact = {}, {}
    for name, (rows, cols) in shapes.items():
        if fmt == "f32":
            w = rng.normal(0, 0.15, (rows, cols)).astype(np.float32)
            given[name], exact[name] = ("f32", w, rows, cols, 0), w.astype(np.float64)
        elif fmt == "bf16":
            w = torch.from_numpy(rng.normal(0, 0.15, (rows, cols)).astype(np.float32)).to(torch.bfloat16)
            given[name] = ("bf16", w.view(torch.int16).numpy(), rows, cols, 0)
            exact[name] = w.double().numpy()
        else:
            raw = torch.from_numpy(gf.random_blocks(fmt, rows, cols, rng, std=0.15).reshape(-1).copy())
            given[name] = (fmt, raw.numpy(), rows, cols, 0)
            exact[name] = QuantTensor(raw, fmt, (rows, cols)).dequantize(torch.float32).double().numpy()
    vectors = {"in_norm": HIDDEN, "post_norm": HIDDEN}
    if extras:
        vectors.update(q_bias=HEADS * D, k_bias=KV_HEADS * D, v_bias=KV_HEADS * D, q_norm=HEADS * D,
                       k_norm=KV_HEADS * D)
    for name, n in vectors.items():
        v = rng.normal(1.0 if "norm" in name else 0.0, 0.2, n).astype(np.float32)
        given[name], exact[name] = v, v.astype(np.float64)
    return given, exact


def rope(pos: int) -> tuple[np.ndarray, np.ndarray]:
    freqs = pos / 10000.0 ** (np.arange(0, D, 2) / D)
    emb = np.concatenate([freqs, freqs])
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def reference(h, pos, cos, sin, w, k_cache, v_cache, clip):
    """(h after the block, post-attention norm, router logits, the new k and v)."""
    def norm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x) + EPS))

    def rotate(x):
        half = D // 2
        return x * cos + np.concatenate([-x[:, half:], x[:, :half]], axis=1) * sin

    n = norm(h, w["in_norm"])
    q, k, v = (w[p] @ n + w.get(p + "_bias", 0.0) for p in "qkv")
    if "q_norm" in w:
        q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
    if clip:
        q, k, v = (np.clip(t, -clip, clip) for t in (q, k, v))
    q, k, v = rotate(q.reshape(HEADS, D)), rotate(k.reshape(KV_HEADS, D)), v.reshape(KV_HEADS, D)
    keys = np.concatenate([k_cache[:pos], k[None]]).astype(np.float64)  # [S, KVH, D]
    vals = np.concatenate([v_cache[:pos], v[None]]).astype(np.float64)
    out = np.empty((HEADS, D))
    for head in range(HEADS):
        g = head // (HEADS // KV_HEADS)
        scores = keys[:, g] @ q[head] / np.sqrt(D)
        p = np.exp(scores - scores.max())
        out[head] = (p / p.sum()) @ vals[:, g]
    h = h + w["o"] @ out.reshape(-1)
    post = norm(h, w["post_norm"])
    return h, post, w["router"] @ post, k, v


def run_step(given, pos, capacity=1024, clip=0.0, seed=1):
    rng = np.random.default_rng(seed)
    k_cache = rng.normal(0, 1, (capacity, KV_HEADS, D)).astype(np.float32)  # earlier positions
    v_cache = rng.normal(0, 1, (capacity, KV_HEADS, D)).astype(np.float32)
    before = k_cache.copy(), v_cache.copy()
    step = _core.AttentionStep(HIDDEN, HEADS, KV_HEADS, D, EPS, clip, given, k_cache, v_cache)
    h = rng.normal(0, 1, HIDDEN).astype(np.float32)
    cos, sin = rope(pos)
    h0, post, logits = h.copy(), np.empty(HIDDEN, np.float32), np.empty(EXPERTS, np.float32)
    step(h, pos, cos, sin, post, logits)
    return h0, h, post, logits, k_cache, v_cache, before, (cos, sin)


def assert_close(actual, expected, rtol):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * float(np.abs(expected).max()))


# 5: one thread; 700 past positions: heads split across the kernel threads
@pytest.mark.parametrize("pos", [0, 5, 700])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_matches_a_float64_reference(path, pos, clip):
    given, exact = layer(np.random.default_rng(0))
    h0, h, post, logits, k_cache, v_cache, (k_before, v_before), (cos, sin) = run_step(given, pos, clip=clip)
    want_h, want_post, want_logits, want_k, want_v = reference(
        h0.astype(np.float64), pos, cos, sin, exact, k_before, v_before, clip)
    assert_close(h, want_h, 1e-5)
    assert_close(post, want_post, 1e-5)
    assert_close(logits, want_logits, 1e-5)
    assert_close(k_cache[pos], want_k, 1e-5)
    assert_close(v_cache[pos], want_v, 1e-5)
    # only position pos was written
    others = np.arange(len(k_cache)) != pos
    assert np.array_equal(k_cache[others], k_before[others]) and np.array_equal(v_cache[others], v_before[others])


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0"])
def test_weights_are_multiplied_as_stored(fmt):
    """Against the dequantized weights: Q8_0 and Q4_0 round x per 32 values (linear.h)."""
    given, exact = layer(np.random.default_rng(2), fmt, extras=False)
    h0, h, post, logits, _, _, (k_before, v_before), (cos, sin) = run_step(given, 9)
    want_h, want_post, want_logits, _, _ = reference(h0.astype(np.float64), 9, cos, sin, exact, k_before, v_before,
                                                     0.0)
    rtol = 1e-5 if fmt == "bf16" else 2e-3
    assert_close(h, want_h, rtol)
    assert_close(logits, want_logits, rtol)


def test_a_dense_layer_needs_no_logits():
    given, _ = layer(np.random.default_rng(3))
    del given["router"]
    k_cache = np.zeros((8, KV_HEADS, D), np.float32)
    step = _core.AttentionStep(HIDDEN, HEADS, KV_HEADS, D, EPS, 0.0, given, k_cache, k_cache.copy())
    assert step.router_rows == 0
    cos, sin = rope(0)
    step(np.ones(HIDDEN, np.float32), 0, cos, sin, np.empty(HIDDEN, np.float32))


@pytest.mark.parametrize("family", DECODERS)
def test_decode_matches_the_torch_path(tmp_path, monkeypatch, family):
    """Each family's decode steps (Qwen2-MoE: biases, a dense layer; OLMoE: q/k norms,
    clip_qkv) take the native step; without it, the torch ops: the same logits within float
    rounding, token by token over the same sequence."""
    make_decoder(tmp_path, family)
    sequence = [3, 17, 42, 99, 5, 61, 7, 150, 33, 8, 21, 64]

    def logits(model) -> torch.Tensor:
        runner, seq = model.runner, model.sequence
        runner.step([(seq, torch.tensor(sequence[:4]))])  # a prefill, then one token at a time
        return torch.cat([runner.step([(seq, torch.tensor([t]))])[0] for t in sequence[4:]])

    with moeedge.load(tmp_path, memory_budget="8GiB") as model:
        assert all(step is not None for step in model.runner.steps[0])
        native = logits(model)
    monkeypatch.setattr(DecoderMoE, "_attention_step", lambda self, layer, slot: None)
    with moeedge.load(tmp_path, memory_budget="8GiB") as model:
        reference_logits = logits(model)
    torch.testing.assert_close(native, reference_logits, rtol=0, atol=1e-5 * float(reference_logits.abs().max()))


def test_a_quantized_gguf_decodes_as_the_torch_path(tmp_path, monkeypatch):
    quantized, _ = gf.quantized_mixtral(tmp_path, "q8_0")

    def logits() -> torch.Tensor:
        with moeedge.load(quantized, memory_budget="8GiB") as model:
            runner, seq = model.runner, model.sequence
            runner.step([(seq, torch.tensor([3, 9, 27]))])
            return torch.cat([runner.step([(seq, torch.tensor([t]))])[0] for t in [5, 11, 2, 40]])

    native = logits()
    monkeypatch.setattr(DecoderMoE, "_attention_step", lambda self, layer, slot: None)
    reference_logits = logits()
    torch.testing.assert_close(native, reference_logits, rtol=0, atol=2e-3 * float(reference_logits.abs().max()))


# -- bad input ---------------------------------------------------------------------------
def make(given, heads=HEADS, kv_heads=KV_HEADS, head_dim=D, capacity=8):
    cache = np.zeros((capacity, kv_heads, head_dim), np.float32)
    return _core.AttentionStep(HIDDEN, heads, kv_heads, head_dim, EPS, 0.0, given, cache, cache.copy())


def test_a_projection_of_the_wrong_shape_is_named():
    given, _ = layer(np.random.default_rng(4))
    w = np.zeros((HEADS * D, HIDDEN - 32), np.float32)
    given["q"] = ("f32", w, HEADS * D, HIDDEN - 32, 0)
    with pytest.raises(ValueError, match=r"q_proj is \[128, 32\], the layer needs \[128, 64\]"):
        make(given)


def test_a_buffer_that_is_not_the_matrix_bytes_is_named():
    given, _ = layer(np.random.default_rng(4))
    given["o"] = ("f32", np.zeros(HIDDEN * HEADS * D - 1, np.float32), HIDDEN, HEADS * D, 0)
    with pytest.raises(ValueError, match=r"o holds 32764 bytes; f32 \[64, 128\] needs 32768"):
        make(given)


def test_heads_that_do_not_group_and_an_odd_head_dim_are_refused():
    given, _ = layer(np.random.default_rng(4))
    with pytest.raises(ValueError, match="4 query heads do not split into 3 KV-head groups"):
        make(given, kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be even, got 31"):
        make(given, head_dim=31)


def test_missing_and_misshapen_norms_are_named():
    given, _ = layer(np.random.default_rng(4))
    given["k_norm"] = np.ones(KV_HEADS * D + 1, np.float32)
    with pytest.raises(ValueError, match="k_norm has 65 values, the layer needs 64"):
        make(given)
    del given["k_norm"], given["in_norm"]
    with pytest.raises(ValueError, match="input_layernorm has 0 values, the layer needs 64"):
        make(given)


def test_a_cache_that_is_not_whole_positions_is_refused():
    given, _ = layer(np.random.default_rng(4))
    with pytest.raises(ValueError, match="k_cache holds 100 values, not whole positions of kv_heads x head_dim = 64"):
        _core.AttentionStep(HIDDEN, HEADS, KV_HEADS, D, EPS, 0.0, given, np.zeros(100, np.float32),
                            np.zeros(100, np.float32))


def test_bad_calls_are_refused_and_write_nothing():
    given, _ = layer(np.random.default_rng(4))
    step = make(given, capacity=8)
    cos, sin = rope(0)
    h, post, logits = np.ones(HIDDEN, np.float32), np.empty(HIDDEN, np.float32), np.empty(EXPERTS, np.float32)
    with pytest.raises(IndexError, match="position 8 is past the KV cache's 8"):
        step(h, 8, cos, sin, post, logits)
    with pytest.raises(ValueError, match="this layer has a router: logits are needed"):
        step(h, 0, cos, sin, post)
    with pytest.raises(ValueError, match="h must be float32"):
        step(h.astype(np.float64), 0, cos, sin, post, logits)
    with pytest.raises(ValueError, match="cos has 31 values, 32 expected"):
        step(h, 0, cos[:-1], sin, post, logits)
    assert np.array_equal(h, np.ones(HIDDEN, np.float32))
