"""Zero-copy torch views of cached expert bytes."""
from __future__ import annotations

import warnings

import torch

from moeedge._core import ExpertBuffer

# torch.frombuffer warns, once per process, that a read-only buffer becomes a writable
# tensor. We spend that one warning here, silenced knowingly: nothing in moeedge ever
# writes into expert weights. (A catch_warnings block on every call would cost ~10 us
# and is not thread-safe.)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(bytes(1), dtype=torch.uint8)


def expert_view(buf: ExpertBuffer, dtype: torch.dtype, offset: int = 0, count: int = -1) -> torch.Tensor:
    """A 1-D tensor over ``buf`` without a copy; the tensor pins the buffer."""
    return torch.frombuffer(buf, dtype=dtype, offset=offset, count=count)
