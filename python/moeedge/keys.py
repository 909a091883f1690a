"""Expert keys: one 64-bit integer ``layer << 32 | expert`` shared with the C++ core."""
from __future__ import annotations

from typing import NamedTuple

_U32 = 1 << 32


class ExpertKey(NamedTuple):
    """An expert by MoE-layer index (execution order, dense layers skipped) and expert index."""

    layer: int
    expert: int

    def __int__(self) -> int:
        return self.packed

    @property
    def packed(self) -> int:
        if not (0 <= self.layer < _U32 and 0 <= self.expert < _U32):
            raise ValueError(f"expert key out of range: layer={self.layer}, expert={self.expert}")
        return self.layer << 32 | self.expert

    __index__ = __int__

    @classmethod
    def unpack(cls, key: int) -> "ExpertKey":
        if not 0 <= key < 1 << 64:
            raise ValueError(f"expert key out of range: {key}")
        return cls(key >> 32, key & (_U32 - 1))


_VARIANT_SHIFT = 48
_U16 = 1 << 16


class VariantKey(NamedTuple):
    """One representation of an expert (moeedge.ladder: int8, int4, ...), a key space of
    its own: ``variant << 48 | layer << 32 | expert`` with variant 1..65535, so it never
    equals an ExpertKey of a layer below 2**16 (the as-stored representation, variant 0,
    keeps its ExpertKey) and two representations of one expert never share a cache entry."""

    layer: int
    expert: int
    variant: int

    def __int__(self) -> int:
        return self.packed

    @property
    def packed(self) -> int:
        if not (0 <= self.layer < _U16 and 0 <= self.expert < _U32 and 1 <= self.variant < _U16):
            raise ValueError(f"variant key out of range: layer={self.layer}, expert={self.expert}, "
                             f"variant={self.variant} (layer below 2**16, variant 1 to 2**16 - 1)")
        return self.variant << _VARIANT_SHIFT | self.layer << 32 | self.expert

    __index__ = __int__


def expert_key(layer: int, expert: int, variant: int = 0) -> int:
    """The packed cache key of an expert in a representation (0: as stored, its ExpertKey)."""
    return ExpertKey(layer, expert).packed if variant == 0 else VariantKey(layer, expert, variant).packed


def split_key(key: int) -> tuple[int, int, int]:
    """(layer, expert, variant) of a packed ExpertKey or VariantKey (variant 0: as stored)."""
    if not 0 <= key < 1 << 64:
        raise ValueError(f"expert key out of range: {key}")
    variant = key >> _VARIANT_SHIFT
    return (key >> 32) & (_U16 - 1 if variant else _U32 - 1), key & (_U32 - 1), variant
