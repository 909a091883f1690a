"""Matrix products on weights as they are stored: fp32 activations times bf16 weights
go through the native kernel (no fp32 copy of the weights is made); everything else
through torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeedge import _core

# Up to this many tokens a product is memory-bound and the native kernel wins; above,
# converting the weights once and using torch's fp32 GEMM is faster.
NATIVE_MAX_TOKENS = 16


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T (+ bias), in x's dtype."""
    if w.dtype == x.dtype:
        return F.linear(x, w, bias)
    if w.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= NATIVE_MAX_TOKENS:
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        _core.linear_bf16(x.contiguous().numpy(), w.view(torch.int16).numpy(), out.numpy())
        return out if bias is None else out + bias
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
