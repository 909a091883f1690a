"""The bf16 matrix-vector product a decode step is made of: moeedge's native kernel
against torch on the same weights, one token (`tg`-style), in GB/s of weights read."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeedge import _core
from moeedge.kernels import linear

SHAPES = {"up_3584x1024": (3584, 1024), "down_1024x3584": (1024, 3584), "lm_head_32000x1024": (32000, 1024)}


def _weights(rows: int, cols: int):
    gen = torch.Generator().manual_seed(rows + cols)
    return torch.randn(rows, cols, generator=gen).to(torch.bfloat16), torch.randn(1, cols, generator=gen)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["native", "torch_bf16", "torch_fp32_convert"])
def test_matvec_bf16(benchmark, shape, impl):
    benchmark.group = f"matvec_bf16_{shape}"
    w, x = _weights(*SHAPES[shape])
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if impl == "native" else threads)  # as the decoder runs them
    fn = {"native": lambda: linear(x, w),
          "torch_bf16": lambda: F.linear(x.to(torch.bfloat16), w).float(),
          "torch_fp32_convert": lambda: F.linear(x, w.float())}[impl]
    try:
        out = benchmark(fn)
    finally:
        torch.set_num_threads(threads)
    tolerance = 0.5 if impl == "torch_bf16" else 2e-2  # torch_bf16 also rounds x and the output to bf16
    torch.testing.assert_close(out, F.linear(x, w.float()), atol=tolerance, rtol=2e-2)
    benchmark.extra_info["gb_per_s"] = w.numel() * 2 / benchmark.stats["median"] / 1e9
    benchmark.extra_info["path"] = _core.linear_path() if impl == "native" else impl


@pytest.mark.parametrize("impl", ["native", "torch_dequantize"])
def test_matvec_q8_0(benchmark, impl):
    """A GGUF Q8_0 expert matrix (14336x4096 in Mixtral-8x7B; 3584x1024 here), one token."""
    from moeedge.formats.gguf_quants import dequantize
    from moeedge.kernels import QuantTensor

    benchmark.group = "matvec_q8_0_up_3584x1024"
    gen = torch.Generator().manual_seed(0)
    rows, cols = 3584, 1024
    blocks = torch.randn(rows * cols // 32, 32, generator=gen)
    d = (blocks.abs().amax(1, keepdim=True) / 127).to(torch.float16)
    q = torch.round(blocks / d.float()).clamp(-127, 127).to(torch.int8)
    raw = torch.cat([d.view(torch.uint8).reshape(-1, 2), q.view(torch.uint8)], 1).reshape(-1)
    w, x = QuantTensor(raw, "q8_0", (rows, cols)), torch.randn(1, cols, generator=gen)
    fn = {"native": lambda: linear(x, w),
          "torch_dequantize": lambda: F.linear(x, dequantize(raw, "q8_0", (rows, cols), torch.float32))}[impl]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if impl == "native" else threads)
    try:
        out = benchmark(fn)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, F.linear(x, dequantize(raw, "q8_0", (rows, cols), torch.float32)),
                               atol=1e-3, rtol=1e-4)
    benchmark.extra_info["gb_per_s"] = raw.numel() / benchmark.stats["median"] / 1e9
