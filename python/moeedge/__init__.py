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
]
