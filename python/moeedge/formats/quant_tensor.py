"""A quantized matrix kept as its stored bytes, as the format layer hands it to the
runtime and the kernels (moeedge.kernels multiplies it as stored)."""
from __future__ import annotations

import torch

from moeedge.formats.gguf_quants import dequantize
from moeedge.formats.group_quant import QUANTS as GROUP_QUANTS
from moeedge.formats.group_quant import dequantize_packed


class QuantTensor:
    """A quantized [out, in] matrix kept as its raw bytes (1-D uint8): GGUF blocks, or for
    moeedge's group-wise quants ("int8_g32", ...) qweight bytes followed by scales bytes."""

    def __init__(self, raw: torch.Tensor, quant: str, shape: tuple[int, ...]):
        self.raw, self.quant, self.shape = raw, quant, tuple(shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant in GROUP_QUANTS:
            return dequantize_packed(self.raw, self.quant, self.shape, dtype)
        return dequantize(self.raw, self.quant, self.shape, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows at index [T] -> [T, in]: an embedding lookup."""
        raw = self.raw.view(self.shape[0], -1)[index]
        return dequantize(raw.reshape(-1), self.quant, (len(index), self.shape[1]), dtype)
