"""moeedge's group-wise symmetric int8 and int4 weights, in torch (the native kernels in
csrc/linear_group.cpp read the same bytes).

An [out, in] matrix is cut along each row into groups of G consecutive weights (G = 32,
64 or 128; `in` must be a multiple of 32, and when it is not a multiple of G the last
group of each row is shorter). Each group has one fp16 scale, and weight = scale * q:

- int8: `qweight` int8 [out, in], q in -127..127, scale = max|w| / 127 (symmetric: -128
  would buy nothing at 8 bits and break q -> -q).
- int4: `qweight` uint8 [out, in / 2], two weights per byte: byte j of a row holds weight
  2j in its low nibble and weight 2j + 1 in its high nibble, each stored as q + 8. q is in
  -8..7 and scale = m / -8, m being the group's weight of largest magnitude with its sign
  (as llama.cpp's Q4_0): that weight lands exactly on -8 and all 16 levels are used. On the
  trained default model's experts this gives 11-12% less relative error than -7..7 with
  scale = max|w| / 7 (G = 32: 0.086 against 0.097), though a weight near -m rounds to 7.
- `scales` fp16 [out, ceil(in / G)]. Each q is rounded from the weight divided by the
  fp16 scale, so dequantizing gives the nearest representable value. A group of zeros has
  scale 0; a scale below fp16's range rounds to 0 or a subnormal.

In a packed expert (the runtime's bytes of one expert) a matrix is its qweight bytes
followed by its scales bytes; ExpertPart.quant names the layout, e.g. "int4_g128".
"""
from __future__ import annotations

import math

import torch

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
# quant name -> (bits, group)
QUANTS: dict[str, tuple[int, int]] = {f"int{b}_g{g}": (b, g) for b in BITS for g in GROUP_SIZES}
QRANGE = {8: (-127, 127), 4: (-8, 7)}


def quant_name(bits: int, group: int) -> str:
    name = f"int{bits}_g{group}"
    if name not in QUANTS:
        raise ValueError(f"no group-wise format for {bits} bits in groups of {group}; bits must be 4 or 8 and "
                         f"the group {', '.join(map(str, GROUP_SIZES))}")
    return name


def _check_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) != 2 or shape[1] % 32:
        raise ValueError(f"group-wise quantization takes [out, in] matrices with in a multiple of 32, "
                         f"got {list(shape)}")
    return shape


def qweight_shape(bits: int, shape: tuple[int, int]) -> tuple[int, int]:
    out, inn = _check_shape(shape)
    return (out, inn) if bits == 8 else (out, inn // 2)


def scales_shape(group: int, shape: tuple[int, int]) -> tuple[int, int]:
    out, inn = _check_shape(shape)
    return out, math.ceil(inn / group)


def packed_nbytes(quant: str, shape: tuple[int, int]) -> int:
    """Bytes of qweight followed by scales."""
    bits, group = QUANTS[quant]
    return math.prod(qweight_shape(bits, shape)) + 2 * math.prod(scales_shape(group, shape))


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, ceil(in / group), group], the short last group padded with zeros."""
    out, inn = w.shape
    return torch.nn.functional.pad(w, (0, (-inn) % group)).view(out, -1, group)


def quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (qweight, scales) as described above."""
    quant_name(bits, group)
    out, inn = _check_shape(tuple(w.shape))
    g = _groups(w.float(), group)                                     # [out, n, G]
    if not torch.isfinite(g).all():
        raise ValueError("cannot quantize a matrix holding NaN or infinity")
    if bits == 8:
        scale = g.abs().amax(-1, keepdim=True) / 127
    else:
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))    # [out, n, 1] signed
        scale = extreme / -8
    scale = scale.to(torch.float16)
    if torch.isinf(scale).any():
        raise ValueError(f"a weight of magnitude {float(g.abs().max()):.4g} overflows the fp16 scales")
    s = scale.float()
    q = torch.where(s != 0, g / s, torch.zeros_like(g)).round().clamp(*QRANGE[bits])
    q = q.to(torch.int8).view(out, -1)[:, :inn]
    if bits == 4:
        u = (q + 8).to(torch.uint8)
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return q.contiguous(), scale.view(out, -1).contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(qweight, scales) -> [out, in] of dtype: the product computed in fp32, rounded once."""
    if bits == 8:
        q = qweight.view(torch.int8).float()
    else:
        u = qweight.view(torch.uint8)
        q = torch.stack([u & 15, u >> 4], dim=-1).view(u.shape[0], -1).float() - 8   # [out, in]
    out, inn = q.shape
    w = _groups(q, group) * scales.view(torch.float16).float()[..., None]
    return w.view(out, -1)[:, :inn].to(dtype)


def split_packed(raw: torch.Tensor, quant: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed matrix (1-D uint8: qweight bytes, then scales bytes) -> views (qweight, scales)."""
    bits, group = QUANTS[quant]
    qshape, sshape = qweight_shape(bits, shape), scales_shape(group, shape)
    qbytes = math.prod(qshape)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != packed_nbytes(quant, shape):
        raise ValueError(f"{quant}{list(shape)} needs {packed_nbytes(quant, shape)} bytes as a 1-D uint8 tensor, "
                         f"got {raw.dtype} {list(raw.shape)}")
    qweight = raw[:qbytes].view(qshape)
    scales = raw[qbytes:].view(torch.float16).view(sshape)  # qbytes is even: in is a multiple of 32
    return (qweight.view(torch.int8) if bits == 8 else qweight), scales


def dequantize_packed(raw: torch.Tensor, quant: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    bits, group = QUANTS[quant]
    return dequantize(*split_packed(raw, quant, shape), bits, group, dtype)
