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
