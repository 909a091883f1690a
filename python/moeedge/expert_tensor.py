"""Zero-copy torch views of cached expert bytes."""
from __future__ import annotations

import warnings

import torch

from moeedge._core import ExpertBuffer


def expert_view(buf: ExpertBuffer, dtype: torch.dtype, offset: int = 0,
                count: int = -1) -> torch.Tensor:
    """A 1-D tensor over ``buf`` without a copy; the tensor pins the buffer.

    torch.frombuffer warns that the read-only buffer becomes a writable tensor:
    we silence that knowingly, and nothing in moeedge ever writes into expert
    weights.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.frombuffer(buf, dtype=dtype, offset=offset, count=count)
