"""GGML block quantisations, dequantised with torch.

Q8_0 (ggml-common.h `block_q8_0`): each run of 32 weights along a row is one 34-byte
block, a float16 scale d then 32 int8 quants q; the weight is d * q. A row of n
weights is n / 32 blocks, rows follow each other, so an [out, in] matrix is
out * in / 32 blocks in row-major order.
"""
from __future__ import annotations

import math

import torch

# quant -> (weights per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {"q8_0": (32, 34)}


def quant_nbytes(quant: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of this shape; its innermost dimension must be whole blocks."""
    block, block_bytes = BLOCKS[quant]
    if not shape or shape[-1] % block:
        raise ValueError(f"{quant}: rows of {shape[-1] if shape else 0} weights are not whole {block}-weight blocks")
    return math.prod(shape) // block * block_bytes


def dequantize(raw: torch.Tensor, quant: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """raw: 1-D uint8 blocks -> a [*shape] tensor of dtype."""
    if quant not in BLOCKS:
        raise ValueError(f"quantisation {quant!r} is not supported; supported: {', '.join(BLOCKS)}")
    expected = quant_nbytes(quant, tuple(shape))
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != expected:
        raise ValueError(f"{quant}{list(shape)} needs {expected} bytes as a 1-D uint8 tensor, "
                         f"got {raw.dtype} {list(raw.shape)}")
    return _dequantize_q8_0(raw, tuple(shape), dtype)


def _dequantize_q8_0(raw: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    blocks = raw.view(-1, 34)                               # [N, 34]
    d = blocks[:, :2].contiguous().view(torch.float16)      # [N, 1] scales
    q = blocks[:, 2:].contiguous().view(torch.int8)         # [N, 32] quants (a contiguous copy: 2x faster multiply)
    # float16 holds every int8 and every fp16 scale exactly, so d * q rounds once either
    # way; bfloat16 would round the scale first, so it goes through float32.
    work = dtype if dtype in (torch.float32, torch.float16) else torch.float32
    w = torch.mul(q, d.to(work))                            # int8 * float promotes to float: one pass
    return w.to(dtype).view(shape)
