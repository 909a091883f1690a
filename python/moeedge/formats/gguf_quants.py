"""GGML block quantisations, dequantised with torch (no loop over blocks).

Each run of B weights along a row is one block (ggml-common.h); a row of n weights is
n / B blocks, rows follow each other, so an [out, in] matrix is out * in / B blocks in
row-major order. fp16 fields are little-endian.

- Q8_0, 32 weights in 34 bytes: fp16 d, 32 int8 q; weight = d * q.
- Q4_0, 32 weights in 18 bytes: fp16 d, 16 bytes whose low nibbles are weights 0..15
  and high nibbles weights 16..31; weight = d * (q - 8).
- Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc and
  mins m for 8 sub-blocks of 32, then 128 bytes: each 32 bytes hold a pair of
  sub-blocks, the first in the low nibbles, the second in the high ones;
  weight = d * sc * q - dmin * m.
- Q5_K, 256 weights in 176 bytes: Q4_K's d, dmin and 12 scale bytes, then qh[32]
  (bit j of byte l is the fifth bit of weight l of sub-block j), then Q4_K's 128 bytes of
  nibbles; weight = d * sc * q - dmin * m with q in 0..31.
- Q6_K, 256 weights in 210 bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), int8
  scales[16] (one per 16 weights), fp16 d; weight = d * scale * (q - 32).

The K-quants compute in float32 in the same order as gguf's numpy reference
(gguf.quants), so results match it bit for bit, and then round once to the dtype asked.
"""
from __future__ import annotations

import math

import torch

# quant -> (weights per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_k": (256, 144), "q5_k": (256, 176),
                                      "q6_k": (256, 210)}


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
    if quant == "q8_0":
        return _dequantize_q8_0(raw, tuple(shape), dtype)
    blocks = raw.view(-1, BLOCKS[quant][1])
    w = {"q4_0": _q4_0, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}[quant](blocks)  # [N, weights per block] float32
    return w.to(dtype).view(shape)


def _dequantize_q8_0(raw: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    blocks = raw.view(-1, 34)                               # [N, 34]
    d = blocks[:, :2].contiguous().view(torch.float16)      # [N, 1] scales
    q = blocks[:, 2:].contiguous().view(torch.int8)         # [N, 32] quants (a contiguous copy: 2x faster multiply)
    # float16 holds every int8 and every fp16 scale exactly, so d * q rounds once either
    # way; bfloat16 would round the scale first, so it goes through float32.
    work = dtype if dtype in (torch.float32, torch.float16) else torch.float32
    w = torch.mul(q, d.to(work))                            # int8 * float promotes to float: one pass
    return w.to(dtype).view(shape)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of each block -> [N, 1] float32."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    qs = blocks[:, 2:]                                                         # [N, 16]
    q = torch.cat([qs & 15, qs >> 4], dim=1).to(torch.int8) - 8                # [N, 32] weights 0..15, 16..31
    return _f16(blocks, 0) * q                                                 # exact in float32


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_scaled(blocks, _nibbles(blocks[:, 16:]))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)  # [N, 8, 32]
    return _k_scaled(blocks, _nibbles(blocks[:, 48:]) | ((qh & 1) << 4))


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes of Q4_K/Q5_K nibbles per block -> [N, sub-block, 32]: each 32 bytes hold a
    pair of sub-blocks, the first in the low nibbles."""
    qs = qs.reshape(qs.shape[0], 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(qs.shape[0], 8, 32)


def _k_scaled(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d * sc * q - dmin * m with Q4_K/Q5_K's header (d, dmin, 12 scale bytes); q [N, 8, 32]."""
    n = blocks.shape[0]
    s = blocks[:, 4:16]                                                        # ggml's get_scale_min_k4
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=1)           # [N, 8] 6-bit scales
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)          # [N, 8] 6-bit mins
    d = (_f16(blocks, 0) * sc).unsqueeze(-1)                                   # [N, 8, 1]
    dm = (_f16(blocks, 2) * m).unsqueeze(-1)
    return (d * q - dm).reshape(n, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)                                  # [N, half, 1, 64]
    ql = torch.cat([ql & 15, ql >> 4], dim=2).reshape(n, 8, 32)               # groups of 32: l, l+32, l+64, l+96
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = ((ql | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    scales = blocks[:, 192:208].contiguous().view(torch.int8)                 # [N, 16]
    d = (_f16(blocks, 208) * scales).unsqueeze(-1)                             # [N, 16, 1]
    return (d * q).reshape(n, 256)
