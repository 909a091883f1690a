"""The native expert feed-forward (moeedge._core.ExpertFfn): one call for gate, up, SiLU,
multiply and down on an expert's bytes as stored, against the same products made one
kernel at a time through moeedge.kernels.linear and torch, for every format; and the
errors a bad layout gets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gguf_fixtures as gf
import moeedge
from moeedge import _core
from moeedge.formats.group_quant import QUANTS, quantize
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.kernels import linear
from tiny_checkpoints import DECODERS, make_decoder

H, I = 256, 512  # hidden, intermediate: whole Q4_K/Q6_K super-blocks both ways


def matrix(fmt: str, rows: int, cols: int, rng: np.random.Generator):
    """(the stored bytes, what kernels.linear takes, the ExpertFfn format, its group)."""
    if fmt == "bf16":
        w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05).to(torch.bfloat16)
        return w.view(torch.uint8).reshape(-1), w, "bf16", 0
    if fmt in QUANTS:
        bits, group = QUANTS[fmt]
        q, s = quantize(torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05), bits, group)
        raw = torch.cat([q.view(torch.uint8).reshape(-1), s.view(torch.uint8).reshape(-1)])
        return raw, QuantTensor(raw, fmt, (rows, cols)), f"int{bits}", group
    raw = torch.from_numpy(gf.random_blocks(fmt, rows, cols, rng).reshape(-1).copy())
    return raw, QuantTensor(raw, fmt, (rows, cols)), fmt, 0


def expert(fmt: str, seed: int = 0, lead: int = 3):
    """Gate, up and down packed into one buffer behind `lead` odd bytes; their specs and weights."""
    rng = np.random.default_rng(seed)
    pieces, specs, weights, offset = [torch.zeros(lead, dtype=torch.uint8)], [], [], lead
    for rows, cols in ((I, H), (I, H), (H, I)):
        raw, w, name, group = matrix(fmt, rows, cols, rng)
        pieces.append(raw)
        specs.append((name, offset, rows, cols, group))
        weights.append(w)
        offset += raw.numel()
    return torch.cat(pieces).numpy(), specs, weights


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "int8_g32", "int4_g64"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_matches_the_kernels_one_at_a_time(path, fmt, tokens):
    buf, specs, (gate, up, down) = expert(fmt)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(1))
    out = torch.empty(tokens, H)
    _core.ExpertFfn(*specs)(x.numpy(), buf, out.numpy(), 0.75)
    expected = linear(F.silu(linear(x, gate)) * linear(x, up), down) * 0.75
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("magnitude", [1e-3, 300.0])  # gate products near 0, and far past where e^-x overflows
def test_silu_holds_at_every_magnitude(magnitude):
    buf, specs, (gate, up, down) = expert("bf16", seed=2)
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(3)) * magnitude
    out = torch.empty(2, H)
    _core.ExpertFfn(*specs)(x.numpy(), buf, out.numpy())
    expected = linear(F.silu(linear(x, gate)) * linear(x, up), down)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_threads_do_not_change_the_result():
    buf, specs, _ = expert("q8_0")
    ffn = _core.ExpertFfn(*specs)
    x = torch.randn(1, H).numpy()
    one, two = np.empty((1, H), np.float32), np.empty((1, H), np.float32)
    ffn(x, buf, one, 1.0, 1)
    ffn(x, buf, two, 1.0, 2)
    np.testing.assert_array_equal(one, two)


def test_an_unknown_format_is_named():
    _, specs, _ = expert("q8_0")
    with pytest.raises(ValueError, match="unknown weight format 'q5_1'"):
        _core.ExpertFfn(("q5_1",) + specs[0][1:], specs[1], specs[2])


def test_a_matrix_past_the_expert_bytes_names_role_and_bytes():
    buf, specs, _ = expert("q8_0")
    ffn = _core.ExpertFfn(*specs)
    with pytest.raises(ValueError, match=r"down spans bytes \d+\.\.\d+ of an expert of \d+"):
        ffn(np.zeros((1, H), np.float32), buf[:-1], np.empty((1, H), np.float32))


def test_shapes_that_do_not_chain_are_refused():
    _, specs, _ = expert("bf16")
    down = specs[2][:2] + (H, I - 32, 0)
    with pytest.raises(ValueError, match=r"expert shapes do not chain: .*down \[256, 480\]"):
        _core.ExpertFfn(specs[0], specs[1], down)


def test_a_width_that_is_not_whole_blocks_names_the_role():
    _, specs, _ = expert("q4_k")
    with pytest.raises(ValueError, match="gate: rows of this format hold whole 256-weight blocks, got in = 255"):
        _core.ExpertFfn(specs[0][:3] + (H - 1, 0), specs[1], specs[2])


def test_x_and_out_must_fit_the_expert():
    buf, specs, _ = expert("bf16")
    ffn = _core.ExpertFfn(*specs)
    with pytest.raises(ValueError, match=r"shapes do not fit: x \[1, 255\], out \[1, 256\] for an expert 256 -> 256"):
        ffn(np.zeros((1, H - 1), np.float32), buf, np.empty((1, H), np.float32))


@pytest.mark.parametrize("family", DECODERS)
def test_decode_steps_match_the_torch_path(tmp_path, monkeypatch, family):
    """A bf16 checkpoint's decode steps take the native FFN; with it turned off they take
    moeedge.kernels.linear and torch: the same tokens, logits within float rounding."""
    from moeedge.runtime.experts import ExpertAccess

    make_decoder(tmp_path, family, dtype=torch.bfloat16)
    prompt = list(range(3, 9))

    def decode(model) -> tuple[list[int], torch.Tensor]:
        model.config.eos_token_ids = []
        tokens = list(model.stream_ids(prompt, max_new_tokens=8, temperature=0))
        return tokens, model.runner.step([(model.sequence, torch.tensor(tokens[-1:]))])[0]

    with moeedge.load(tmp_path, memory_budget="8GiB") as model:
        assert model.runner.experts.ffn(0, 0) is not None
        native_tokens, native_logits = decode(model)
    monkeypatch.setattr(ExpertAccess, "ffn", lambda self, layer, expert: None)
    with moeedge.load(tmp_path, memory_budget="8GiB") as model:
        torch_tokens, torch_logits = decode(model)
    assert native_tokens == torch_tokens
    torch.testing.assert_close(native_logits, torch_logits, rtol=0, atol=1e-5 * float(torch_logits.abs().max()))


def test_silu_far_below_zero_is_zero_as_in_torch():
    """Below -88 the SIMD exp clamps; silu must still be -0.0 there (x / inf), not x e^-88:
    multiplied by a huge `up` (weights of 1e36, found by moeedge.fuzz) that was a wrong output."""
    x = torch.tensor([[-20.0, -87.0, -88.5, -89.0, -100.0, -1e30, 50.0, 100.0] * 6])
    got = x.clone()
    _core.silu_mul(got.numpy(), torch.ones_like(x).numpy())
    want = torch.nn.functional.silu(x)
    assert torch.equal(got[:, 2:6], want[:, 2:6]) and torch.equal(torch.signbit(got), torch.signbit(want))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
