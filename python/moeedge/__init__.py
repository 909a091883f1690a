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
    "MoeModel",
    "load",
]


def __getattr__(name: str):
    # Lazy: torch and the model code load on first use of moeedge.load, which keeps
    # `import moeedge` and the CLI's light commands fast; moeedge.load is then api.load
    # itself (inspect.signature and help show its parameters).
    if name in ("load", "MoeModel"):
        from moeedge import api

        return getattr(api, name)
    raise AttributeError(f"module 'moeedge' has no attribute {name!r}")
