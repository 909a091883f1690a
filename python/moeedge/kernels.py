"""Matrix products on weights as they are stored: fp32 activations times bf16 weights
or GGUF Q8_0 blocks go through the native kernels (no fp32 copy of the weights is
made); everything else through torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeedge import _core

# Up to this many tokens a product is memory-bound and the native kernel wins; above,
# converting the weights once and using torch's fp32 GEMM is faster.
NATIVE_MAX_TOKENS = 16


class QuantTensor:
    """A quantized [out, in] matrix kept as its raw blocks (1-D uint8)."""

    def __init__(self, raw: torch.Tensor, quant: str, shape: tuple[int, ...]):
        self.raw, self.quant, self.shape = raw, quant, tuple(shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        from moeedge.formats.gguf_quants import dequantize

        return dequantize(self.raw, self.quant, self.shape, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows at index [T] -> [T, in]: an embedding lookup."""
        from moeedge.formats.gguf_quants import dequantize

        raw = self.raw.view(self.shape[0], -1)[index]
        return dequantize(raw.reshape(-1), self.quant, (len(index), self.shape[1]), dtype)


def linear(x: torch.Tensor, w: torch.Tensor | QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T (+ bias), in x's dtype."""
    if isinstance(w, QuantTensor):
        if w.quant == "q8_0" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= NATIVE_MAX_TOKENS:
            out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
            _core.linear_q8_0(x.contiguous().numpy(), w.raw.numpy(), out.numpy())
            return out if bias is None else out + bias
        w = w.dequantize(x.dtype)
    if w.dtype == x.dtype:
        return F.linear(x, w, bias)
    if w.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= NATIVE_MAX_TOKENS:
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        _core.linear_bf16(x.contiguous().numpy(), w.view(torch.int16).numpy(), out.numpy())
        return out if bias is None else out + bias
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
