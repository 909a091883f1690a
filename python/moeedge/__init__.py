"""moeedge: run Mixture-of-Experts LLMs on devices that cannot hold them."""
from moeedge._core import (
    BudgetError,
    ExpertBuffer,
    ExpertCache,
    ExpertReadError,
    ExpertStore,
    cpu_features,
)
from moeedge._core import __version__
from moeedge.keys import ExpertKey
from moeedge.units import format_bytes, parse_bytes

__all__ = [
    "BudgetError",
    "ExpertBuffer",
    "ExpertCache",
    "ExpertKey",
    "ExpertReadError",
    "ExpertStore",
    "cpu_features",
    "format_bytes",
    "parse_bytes",
    "__version__",
    "load",
]


def load(*args, **kwargs):
    """Open a checkpoint within a memory budget; see moeedge.api.load."""
    from moeedge.api import load as _load

    return _load(*args, **kwargs)
