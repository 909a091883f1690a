"""Matrix products on weights as they are stored: fp32 activations times bf16 weights,
GGUF Q8_0, Q4_0, Q4_K, Q5_K and Q6_K blocks or moeedge's group-wise int8/int4 go through the
native kernels (no fp32 copy of the weights is made); everything else through torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeedge import _core
from moeedge.formats.group_quant import QUANTS as GROUP_QUANTS
from moeedge.formats.quant_tensor import QuantTensor

# Once the limit on tokens for the native bf16 kernel, above which the weights were
# converted to fp32 for torch's GEMM. Now every token count takes the native kernels (one
# code path, so that a row's result does not depend on the batch: tests/test_batch_invariance.py);
# the name stays for models/decoder.py, which still uses it to pick torch's thread count
# for a step and to budget a block of converted weights (which bf16 and fp32 no longer need).
NATIVE_MAX_TOKENS = 16
# Weights of a dtype the kernels do not take (fp16, ...) are converted this many bytes of
# them at a time: a whole fp32 copy would be twice the matrix (224 MiB for a Mixtral-8x7B
# expert's), which no memory plan could afford at prefill.
CONVERT_BLOCK_BYTES = 8 << 20

# quant -> native kernel (csrc/linear*.cpp); Q4_0 and the K-quants round x to int16 per 32
# values first (error bound in csrc/linear.h).
NATIVE_QUANTS = {"q8_0": _core.linear_q8_0, "q4_0": _core.linear_q4_0, "q4_k": _core.linear_q4_k,
                 "q5_k": _core.linear_q5_k, "q6_k": _core.linear_q6_k}
# The prompt kernels (csrc/linear.h): the K-quants with x rounded per 256 values, faster from
# 16 tokens on and about half as fast at one. Batch invariant, but not bit-equal to the
# kernels above: a prompt's products may take them (its result depends only on the prompt),
# never a decode step's, which must equal the one-token kernels whatever the batch.
PROMPT_QUANTS = {"q4_k": _core.linear_q4_k_x256, "q5_k": _core.linear_q5_k_x256, "q6_k": _core.linear_q6_k_x256}
# They pay where AVX-512 VNNI multiplies their int16 pairs (1.5-1.9x the decode kernels from 16
# tokens on, 2 threads); with AVX2 alone they ran at 0.77-0.96x (bench/README.md, "Prompt kernels").
_VNNI = _core.cpu_features().get("avx512vnni", False)


def prompt_kernels_pay() -> bool:
    """Whether a prompt takes PROMPT_QUANTS on the path the kernels take now."""
    return _VNNI and _core.linear_path() == "avx512"
# moeedge's group-wise formats (moeedge.formats.group_quant): bits -> kernel, which takes
# the qweight and scales bytes apart and rounds x as the K-quant kernels do.
GROUP_KERNELS = {8: _core.linear_int8, 4: _core.linear_int4}


NATIVE_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}


def native_format(quant: str | None, dtype: torch.dtype | None) -> tuple[str, int] | None:
    """(format, group) as moeedge._core.ExpertFfn and AttentionStep name a matrix stored as
    `quant` (None: plain `dtype`); None where the kernels cannot multiply it as stored."""
    if quant in NATIVE_QUANTS:
        return quant, 0
    if quant in GROUP_QUANTS:
        bits, group = GROUP_QUANTS[quant]
        return f"int{bits}", group
    if quant is None and dtype in NATIVE_DTYPES:
        return NATIVE_DTYPES[dtype], 0
    return None


def stored(w: torch.Tensor | QuantTensor) -> tuple | None:
    """w as the native kernels take it whole: (format, bytes, rows, cols, group); None where
    they cannot multiply it as stored."""
    quant = w.quant if isinstance(w, QuantTensor) else None
    raw = w.raw if quant is not None else w
    found = native_format(quant, None if quant is not None else w.dtype)
    if found is None or len(w.shape) != 2 or not raw.is_contiguous():
        return None
    if raw.dtype == torch.bfloat16:
        raw = raw.view(torch.int16)  # numpy has no bf16
    return (found[0], raw.numpy(), *w.shape, found[1])


# plain dtype -> native kernel; any number of tokens (csrc/linear_dense.cpp).
DENSE_KERNELS = {torch.bfloat16: _core.linear_bf16, torch.float32: _core.linear_f32}


def linear(x: torch.Tensor, w: torch.Tensor | QuantTensor, bias: torch.Tensor | None = None,
           prompt: bool = False) -> torch.Tensor:
    """x [..., in] @ w[out, in].T (+ bias), in x's dtype. fp32 x times weights the native
    kernels take (NATIVE_DTYPES, NATIVE_QUANTS, moeedge's group-wise quants) gives each row
    the same bits whatever the other rows are and however many there are. prompt: rows of a
    prompt, which may take the prompt kernels (PROMPT_QUANTS)."""
    if x.dim() != 2 and x.dtype == torch.float32 and x.numel():  # the kernels' rows, whatever the leading dims
        out = linear(x.reshape(-1, x.shape[-1]), w, bias, prompt)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if isinstance(w, QuantTensor):
        native = (prompt and prompt_kernels_pay() and PROMPT_QUANTS.get(w.quant)) or NATIVE_QUANTS.get(w.quant)
        if native and x.dtype == torch.float32 and x.dim() == 2:
            out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
            native(x.contiguous().numpy(), w.raw.numpy(), out.numpy())
            return out if bias is None else out + bias
        group = GROUP_QUANTS.get(w.quant)
        if group and x.dtype == torch.float32 and x.dim() == 2:
            bits, size = group
            raw = w.raw.numpy()
            qbytes = w.shape[0] * w.shape[1] * bits // 8  # then the fp16 scales
            out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
            GROUP_KERNELS[bits](x.contiguous().numpy(), raw[:qbytes], raw[qbytes:], out.numpy(), size)
            return out if bias is None else out + bias
        w = w.dequantize(x.dtype)
    dense = DENSE_KERNELS.get(w.dtype)
    if (dense and x.dtype == torch.float32 and x.dim() == 2 and x.numel() and w.dim() == 2 and w.is_contiguous()
            and not (x.requires_grad or w.requires_grad)):
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        dense(x.contiguous().numpy(), (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).numpy(), out.numpy())
        return out if bias is None else out + bias
    if w.dtype == x.dtype:
        return F.linear(x, w, bias)
    return _linear_converting(x, w, None if bias is None else bias.to(x.dtype))


def _linear_converting(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T with w converted to x's dtype CONVERT_BLOCK_BYTES at a time."""
    rows = max(1, CONVERT_BLOCK_BYTES // (w.shape[-1] * x.element_size()))
    if rows >= w.shape[0]:
        return F.linear(x, w.to(x.dtype), bias)
    out = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    for r in range(0, w.shape[0], rows):
        out[..., r:r + rows] = F.linear(x, w[r:r + rows].to(x.dtype))
    return out if bias is None else out + bias
