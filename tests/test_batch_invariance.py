"""Batch invariance: a row's product has the same bits whatever else is in the batch.

Several sequences decoded in one step (a server batching requests; speculative decoding
verifying several tokens at once) must not change greedy output, so every matrix product
gives out[i] the bits that linear(x[i:i+1]) alone gives, whatever the other rows are, how
many there are and how many kernel threads split the work: per weight format, on every
kernel path this CPU has (scalar included), compared with torch.equal, never allclose.

ExpertFfn and AttentionStep (one token's feed-forward and attention block, natively)
multiply through the same kernels (csrc/expert_ffn.cpp linear_stored), so their products
equal moeedge.kernels.linear's bit for bit; checked below where a product can be seen:
- ExpertFfn: out equals linear(silu_mul(linear(x, gate), linear(x, up)), down) * scale with
  _core.silu_mul, ExpertFfn's own SiLU (an exp polynomial on AVX2, std::exp on the scalar
  path and for a row's last n % 8 values). torch's F.silu, which models/decoder.py uses
  above one token, rounds differently: a batched path must use _core.silu_mul (or ExpertFfn
  itself, which takes any number of rows) to give a row ExpertFfn's bits.
- AttentionStep: the k, v, o and router products (q's only moves a softmax over a single
  position here). Its other arithmetic is its own: rms_norm sums squares in double, the
  rotary embedding, softmax (exp polynomial) and the weighted sum of values are fused loops
  that torch's multi-token path in models/decoder.py does not reproduce bit for bit; the
  test makes those steps exact (eps 0 and h of +-1, so the norm's scale is exactly 1;
  cos 1, sin 0; one position) to see the products alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf_fixtures as gf
from moeedge import _core
from moeedge.formats.group_quant import QUANTS, quantize
from moeedge.kernels import QuantTensor, linear

TOKENS = [1, 2, 3, 4, 7, 8, 16, 17, 64, 129]  # up to 8: one pass with a tile as wide as the call
ROWS = 45  # not a multiple of any row block: every tile shape and tail occurs
# (format, in): rows over 1024 wide are cut into K chunks when many tokens share them;
# 1000 and 2311 are not whole SIMD steps (bf16 then takes the portable kernel, fp32 adds
# its last columns one by one); 2336 is 73 blocks of 32, not whole groups of 8 or 2; rows
# under 4 KiB (bf16 1024, f32 256) are read one at a time, longer ones 4 at a time.
CASES = [("bf16", 2304), ("bf16", 1024), ("bf16", 1000), ("f32", 2311), ("f32", 256), ("q8_0", 2336), ("q4_0", 2336),
         ("q4_k", 2304), ("q5_k", 2304), ("q6_k", 2304), ("int8_g32", 2336), ("int4_g64", 2336)]


def weight(fmt: str, rows: int, cols: int, rng: np.random.Generator):
    """(what kernels.linear takes, (format, stored bytes, rows, cols, group) as the native
    FFN and attention take it)."""
    if fmt in ("bf16", "f32"):
        w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05)
        w = w.to(torch.bfloat16) if fmt == "bf16" else w
        return w, (fmt, w.contiguous().view(torch.uint8).reshape(-1).numpy(), rows, cols, 0)
    if fmt in QUANTS:
        bits, group = QUANTS[fmt]
        q, s = quantize(torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05), bits, group)
        raw = torch.cat([q.view(torch.uint8).reshape(-1), s.view(torch.uint8).reshape(-1)])
        return QuantTensor(raw, fmt, (rows, cols)), (f"int{bits}", raw.numpy(), rows, cols, group)
    raw = torch.from_numpy(gf.random_blocks(fmt, rows, cols, rng).reshape(-1).copy())
    return QuantTensor(raw, fmt, (rows, cols)), (fmt, raw.numpy(), rows, cols, 0)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not torch.equal(got, expected):
        differ = (got != expected).reshape(-1, got.shape[-1]).any(dim=-1).nonzero().reshape(-1).tolist()
        diff = float((got - expected).abs().max())
        pytest.fail(f"{what}: rows {differ[:10]} differ (by up to {diff:.3g}) from the rows computed alone")


@pytest.fixture
def kernel_threads():
    yield _core.set_kernel_threads
    _core.set_kernel_threads(0)


# The prompt kernels (kernels.PROMPT_QUANTS): 18 super-blocks, a whole chunk of 16 and a
# part of one (csrc/linear_kquants_x256.cpp), and one super-block.
PROMPT_CASES = [("q4_k", 4608), ("q5_k", 4608), ("q6_k", 4608), ("q6_k", 256)]


def check_rows_alone(fmt: str, cols: int, threads: int, kernel_threads, prompt: bool = False) -> None:
    rng = np.random.default_rng(cols)
    w, _ = weight(fmt, ROWS, cols, rng)
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(max(TOKENS), cols, generator=gen)
    kernel_threads(1)
    alone = torch.cat([linear(x[i:i + 1], w, prompt=prompt) for i in range(len(x))])
    kernel_threads(threads)
    for tokens in TOKENS:
        assert_same_bits(linear(x[:tokens], w, prompt=prompt), alone[:tokens], f"{tokens} rows")
        for k in sorted({0, tokens // 2, tokens - 1}):  # row k among other rows of another scale
            others = torch.randn(tokens, cols, generator=gen) * 7
            others[k] = x[k]
            assert_same_bits(linear(others, w, prompt=prompt)[k:k + 1], alone[k:k + 1], f"row {k} of {tokens} others")


@pytest.mark.parametrize("threads", [1, 0])  # 0: every CPU, rows split across them
@pytest.mark.parametrize("fmt, cols", CASES)
def test_a_row_has_the_same_bits_in_any_batch(path, fmt, cols, threads, kernel_threads):
    check_rows_alone(fmt, cols, threads, kernel_threads)


@pytest.mark.parametrize("threads", [1, 0])
@pytest.mark.parametrize("fmt, cols", PROMPT_CASES)
def test_a_prompt_row_has_the_same_bits_in_any_batch(path, fmt, cols, threads, kernel_threads):
    check_rows_alone(fmt, cols, threads, kernel_threads, prompt=True)


@pytest.mark.parametrize("fmt", ["bf16", "f32"])
def test_leading_dimensions_are_rows_too(fmt):
    w, _ = weight(fmt, ROWS, 512, np.random.default_rng(1))
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(1))
    out = linear(x, w)
    assert out.shape == (3, 5, ROWS)
    assert_same_bits(out.reshape(15, ROWS), torch.cat([linear(row[None], w) for row in x.reshape(15, 512)]), "3 x 5")


def expert(fmt: str, hidden: int, inter: int, seed: int = 0):
    """An expert's gate, up and down packed into one buffer behind 3 odd bytes: (the bytes,
    ExpertFfn's specs, the weights as kernels.linear takes them)."""
    rng = np.random.default_rng(seed)
    pieces, specs, weights, offset = [np.zeros(3, np.uint8)], [], [], 3
    for rows, cols in ((inter, hidden), (inter, hidden), (hidden, inter)):
        w, (name, raw, _, _, group) = weight(fmt, rows, cols, rng)
        pieces.append(raw)
        specs.append((name, offset, rows, cols, group))
        weights.append(w)
        offset += raw.size
    return np.concatenate(pieces), specs, weights


# (format, hidden, intermediate): 300 is not whole SIMD steps (SiLU's scalar tail, fp32's last columns)
EXPERTS = [("f32", 256, 300), ("bf16", 256, 512), ("q8_0", 256, 512), ("q4_0", 256, 512), ("q4_k", 256, 512),
           ("q5_k", 256, 512), ("q6_k", 256, 512), ("int8_g32", 256, 512), ("int4_g64", 256, 512)]


@pytest.mark.parametrize("fmt, hidden, inter", EXPERTS)
def test_expert_ffn_rows_are_batch_invariant_and_are_linear_s(path, fmt, hidden, inter):
    buf, specs, (gate, up, down) = expert(fmt, hidden, inter)
    ffn = _core.ExpertFfn(*specs)
    x = torch.randn(17, hidden, generator=torch.Generator().manual_seed(2))
    batch = torch.empty(17, hidden)
    ffn(x.numpy(), buf, batch.numpy(), 0.75)
    for i in range(len(x)):
        one = torch.empty(1, hidden)
        ffn(x[i:i + 1].numpy(), buf, one.numpy(), 0.75)
        assert_same_bits(batch[i:i + 1], one, f"ExpertFfn row {i} of 17")
    g, u = linear(x, gate), linear(x, up)
    _core.silu_mul(g.numpy(), u.numpy())
    assert_same_bits(batch, linear(g, down) * 0.75, "ExpertFfn against kernels.linear and _core.silu_mul")


ATTENTION_FORMATS = ["f32", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "int8_g32", "int4_g64"]


@pytest.mark.parametrize("fmt", ATTENTION_FORMATS)
def test_attention_step_products_are_linear_s(path, fmt):
    hidden, heads, d, experts = 256, 2, 128, 8  # as many KV heads as heads: head h attends with v's head h
    rng = np.random.default_rng(3)
    ws, weights = {}, {}
    for name, rows in (("q", heads * d), ("k", heads * d), ("v", heads * d), ("o", hidden), ("router", experts)):
        ws[name], weights[name] = weight(fmt, rows, hidden, rng)
    weights["in_norm"] = rng.normal(1.0, 0.2, hidden).astype(np.float32)
    weights["post_norm"] = rng.normal(1.0, 0.2, hidden).astype(np.float32)
    k_cache, v_cache = np.zeros((4, heads, d), np.float32), np.zeros((4, heads, d), np.float32)
    step = _core.AttentionStep(hidden, heads, heads, d, 0.0, 0.0, weights, k_cache, v_cache)
    h0 = rng.choice([-1.0, 1.0], hidden).astype(np.float32)  # mean square 1 and eps 0: the norm's scale is 1
    h, post, logits = h0.copy(), np.empty(hidden, np.float32), np.empty(experts, np.float32)
    step(h, 0, np.ones(d, np.float32), np.zeros(d, np.float32), post, logits)  # cos 1, sin 0: no rotation
    n = torch.from_numpy(weights["in_norm"] * h0)[None]
    k, v = torch.from_numpy(k_cache[0].reshape(1, -1)), torch.from_numpy(v_cache[0].reshape(1, -1))
    assert_same_bits(k, linear(n, ws["k"]), "k")
    assert_same_bits(v, linear(n, ws["v"]), "v")
    # one position: each head's attention is its value row, added to h through o
    assert_same_bits(torch.from_numpy(h)[None], torch.from_numpy(h0)[None] + linear(v, ws["o"]), "h + o(v)")
    assert_same_bits(torch.from_numpy(logits)[None], linear(torch.from_numpy(post)[None], ws["router"]), "router")
