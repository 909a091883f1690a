"""The native bf16 matrix-vector kernel against torch, on every path this CPU has."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeedge import _core
from moeedge.kernels import linear
from conftest import kernel_path



@pytest.mark.parametrize("tokens, rows, cols", [(1, 3584, 1024), (3, 257, 1031), (5, 258, 1040), (16, 64, 7), (1, 1, 32)])
def test_matches_torch_fp32_on_the_same_weights(path, tokens, rows, cols):
    gen = torch.Generator().manual_seed(rows * cols + tokens)
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    x = torch.randn(tokens, cols, generator=gen)
    out = torch.empty(tokens, rows)
    _core.linear_bf16(x.numpy(), w.view(torch.int16).numpy(), out.numpy())
    torch.testing.assert_close(out, F.linear(x, w.float()), atol=1e-4 * cols ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("cols", [1000, 1024])  # 1024: every SIMD path's width; 1000: AVX2's and scalar
def test_paths_agree_within_float_rounding(cols):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, cols, generator=gen).to(torch.bfloat16)
    x = torch.randn(2, cols, generator=gen)
    outs = []
    for name in _core.linear_paths():
        with kernel_path(name):
            out = torch.empty(2, 512)
            _core.linear_bf16(x.numpy(), w.view(torch.int16).numpy(), out.numpy())
            outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-4, rtol=1e-5)


def test_forcing_a_path_the_cpu_lacks_names_the_paths_it_has():
    with pytest.raises(ValueError, match=r"no kernel path 'sse9'.*it has: scalar"):
        _core.linear_force_path("sse9")
    assert _core.linear_path() == _core.linear_paths()[-1]


def test_linear_dispatch_handles_bias_and_large_batches():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=gen).to(torch.bfloat16)
    b = torch.randn(40, generator=gen).to(torch.bfloat16)
    for tokens in (1, 64):  # native kernel, then torch on converted weights
        x = torch.randn(tokens, 24, generator=gen)
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w.float(), b.float()), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("x, w, out, message", [
    (np.zeros((1, 8), np.float32), np.zeros((4, 9), np.int16), np.zeros((1, 4), np.float32), "shapes do not fit"),
    (np.zeros((1, 8), np.float64), np.zeros((4, 8), np.int16), np.zeros((1, 4), np.float32), "4-byte items"),
    (np.zeros((1, 8), np.float32), np.zeros((4, 8), np.int32), np.zeros((1, 4), np.float32), "2-byte items"),
    (np.zeros((1, 8), np.float32), np.zeros((8, 8), np.int16)[:, ::2], np.zeros((1, 8), np.float32), "C-contiguous"),
    (np.zeros(8, np.float32), np.zeros((4, 8), np.int16), np.zeros((1, 4), np.float32), "2-D"),
])
def test_bad_arguments_are_refused(x, w, out, message):
    with pytest.raises(ValueError, match=message):
        _core.linear_bf16(x, w, out)


def test_read_only_output_is_refused():
    out = np.zeros((1, 4), np.float32)
    out.flags.writeable = False
    with pytest.raises((BufferError, ValueError), match="(?i)writ|read-only|readonly"):
        _core.linear_bf16(np.zeros((1, 8), np.float32), np.zeros((4, 8), np.int16), out)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """GGML's Q8_0: per 32 weights a fp16 scale d = max|w| / 127 and int8 q = round(w / d)."""
    blocks = w.reshape(-1, 32)
    d = (blocks.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)
    q = torch.round(blocks / d.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8).reshape(-1, 2), q.view(torch.uint8)], dim=1).reshape(-1)


@pytest.mark.parametrize("tokens, rows, cols", [(1, 3584, 1024), (4, 100, 96), (16, 7, 32)])
def test_q8_0_matches_dequantize_then_matmul(path, tokens, rows, cols):
    from moeedge.formats.gguf_quants import dequantize

    gen = torch.Generator().manual_seed(rows + cols)
    raw = quantize_q8_0(torch.randn(rows, cols, generator=gen))
    x = torch.randn(tokens, cols, generator=gen)
    out = torch.empty(tokens, rows)
    _core.linear_q8_0(x.numpy(), raw.numpy(), out.numpy())
    expected = F.linear(x, dequantize(raw, "q8_0", (rows, cols), torch.float32))
    torch.testing.assert_close(out, expected, atol=1e-4 * cols ** 0.5, rtol=1e-5)


def test_q8_0_bad_arguments_are_refused():
    x, out = np.zeros((1, 64), np.float32), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="needs 272"):
        _core.linear_q8_0(x, np.zeros(100, np.uint8), out)
    with pytest.raises(ValueError, match="whole 32-weight blocks"):
        _core.linear_q8_0(np.zeros((1, 40), np.float32), np.zeros(100, np.uint8), out)


def test_kernel_busy_seconds_counts_the_time_inside_kernel_calls():
    import time

    from moeedge._core import kernel_busy_seconds, linear_f32

    x, w = torch.randn(4, 512), torch.randn(2048, 512)
    out = torch.empty(4, 2048)
    before, start = kernel_busy_seconds(), time.perf_counter()
    for _ in range(20):
        linear_f32(x.numpy(), w.numpy(), out.numpy())
    wall = time.perf_counter() - start
    busy = kernel_busy_seconds() - before
    assert 0 < busy <= wall  # this thread's calls only: other threads here run no kernels
    time.sleep(0.01)
    assert kernel_busy_seconds() - before == busy  # nothing counts between calls
