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
    from moeedge.formats.quant_tensor import QuantTensor

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


# --------------------------------------------------------------------------- one expert matrix, every format

EXPERT_ROWS, EXPERT_COLS = 14336, 4096  # Mixtral-8x7B's w1/w3: [intermediate, hidden]
FORMATS = ["bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k",  # bf16 first: the others report ratios to it
           "int8_g32", "int8_g128", "int4_g32", "int4_g128"]  # moeedge's own (moeedge.formats.group_quant)


def _gguf_blocks(quant: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random blocks with small finite fp16 scales (the kernels' speed does not depend on the values)."""
    import numpy as np

    from moeedge.formats.gguf_quants import BLOCKS

    block, block_bytes = BLOCKS[quant]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block, block_bytes), dtype=np.uint8)
    for at in {"q8_0": [0], "q4_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}[quant]:
        scale = np.abs(rng.normal(0, 1e-3, size=(len(blocks), 1))) + 1e-4
        blocks[:, at:at + 2] = scale.astype(np.float16).view(np.uint8)
    return torch.from_numpy(blocks.reshape(-1))


@pytest.fixture(params=[p for p in _core.linear_paths() if p != "scalar"])
def simd(request):
    """Each SIMD path this CPU has (the widest is what the runtime takes)."""
    _core.linear_force_path(request.param)
    yield request.param
    _core.linear_force_path("")


# 4: a batched step, a verify pass; 128: a prefill chunk (moeedge.runtime.plan.PREFILL_CHUNKS)
@pytest.mark.parametrize("tokens", [1, 4, 16, 128], ids=["tg1", "tg4", "tg16", "pf128"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_expert_formats(benchmark, measured, simd, fmt, tokens):
    """One 14336x4096 expert matrix times T tokens' activations through moeedge.kernels.linear,
    each format read as stored, on each SIMD path: GB/s of stored bytes, and time relative to
    bf16 and Q8_0 on the same path."""
    from moeedge.formats.gguf_quants import dequantize
    from moeedge.formats.quant_tensor import QuantTensor

    benchmark.group = f"matvec_expert_{EXPERT_ROWS}x{EXPERT_COLS}_t{tokens}_{simd}"
    rows, cols = EXPERT_ROWS, EXPERT_COLS
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cols, generator=gen)
    if fmt == "bf16":
        w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
        nbytes, dense = w.numel() * 2, w.float()
    elif fmt.startswith("int"):
        from moeedge.formats.group_quant import QUANTS, dequantize_packed, quantize

        q, s = quantize(torch.randn(rows, cols, generator=gen) * 0.02, *QUANTS[fmt])
        raw = torch.cat([q.view(torch.uint8).reshape(-1), s.view(torch.uint8).reshape(-1)])
        w, nbytes, dense = QuantTensor(raw, fmt, (rows, cols)), raw.numel(), dequantize_packed(raw, fmt, (rows, cols),
                                                                                               torch.float32)
    else:
        raw = _gguf_blocks(fmt, rows, cols)
        w, nbytes, dense = QuantTensor(raw, fmt, (rows, cols)), raw.numel(), dequantize(raw, fmt, (rows, cols),
                                                                                        torch.float32)
    expected = F.linear(x.double(), dense.double()).float()
    del dense
    out = benchmark(lambda: linear(x, w))
    # Q4/Q6/int8/int4 round x to int16 per 32 values: relative error ~2**-16 of the block's largest activation.
    torch.testing.assert_close(out, expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-3)
    seconds = benchmark.stats["median"]
    measured[f"{fmt}_t{tokens}_{simd}"] = seconds
    benchmark.extra_info["gb_per_s"] = nbytes / seconds / 1e9
    benchmark.extra_info["gweights_per_s"] = rows * cols * tokens / seconds / 1e9
    benchmark.extra_info["bits_per_weight"] = nbytes * 8 / (rows * cols)
    for base in ("bf16", "q8_0"):
        if f"{base}_t{tokens}_{simd}" in measured:
            benchmark.extra_info[f"speedup_vs_{base}"] = measured[f"{base}_t{tokens}_{simd}"] / seconds
    benchmark.extra_info["path"] = _core.linear_path()


@pytest.mark.parametrize("tokens", [1, 16, 128], ids=["tg1", "tg16", "pf128"])
@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k"])
def test_matvec_prompt_kernels(benchmark, measured, simd, fmt, tokens):
    """The same matrix through the prompt kernels (moeedge.kernels.PROMPT_QUANTS, x rounded per
    256 values), which a prompt's products take: speedup over the decode kernels' time above."""
    from moeedge.formats.gguf_quants import dequantize
    from moeedge.formats.quant_tensor import QuantTensor

    benchmark.group = f"matvec_expert_{EXPERT_ROWS}x{EXPERT_COLS}_t{tokens}_{simd}"
    rows, cols = EXPERT_ROWS, EXPERT_COLS
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    raw = _gguf_blocks(fmt, rows, cols)
    w = QuantTensor(raw, fmt, (rows, cols))
    expected = F.linear(x.double(), dequantize(raw, fmt, (rows, cols), torch.float64)).float()
    out = benchmark(lambda: linear(x, w, prompt=True))
    torch.testing.assert_close(out, expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-3)
    seconds = benchmark.stats["median"]
    benchmark.extra_info["gb_per_s"] = raw.numel() / seconds / 1e9
    if f"{fmt}_t{tokens}_{simd}" in measured:
        benchmark.extra_info["speedup_vs_decode_kernel"] = measured[f"{fmt}_t{tokens}_{simd}"] / seconds
