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
    benchmark.extra_info["path"] = _core.linear_bf16_path() if impl == "native" else impl
