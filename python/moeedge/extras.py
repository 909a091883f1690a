"""The optional parts of moeedge and the pip extra that installs each. The base install is
what run, chat and serve need; a command that needs more says which extra to install."""
from __future__ import annotations

import argparse
import importlib

# top-level module -> the extra that installs it
EXTRA_OF = {"scipy": "aggregate", "numba": "sim", "llvmlite": "sim", "matplotlib": "plot",
            "llama_cpp": "bench", "transformers": "bench", "accelerate": "bench"}


class MissingExtraError(ValueError):
    """A command needs a module of an extra that is not installed."""


def install_hint(module: str, what: str) -> str:
    extra = EXTRA_OF[module]
    return f"{what} needs {module}, which the base install leaves out: pip install 'moeedge[{extra}]'"


def explain(error: ImportError) -> str | None:
    """The one line to print for an ImportError of an extra's module; None for any other."""
    module = (error.name or "").split(".")[0]
    return install_hint(module, "this command") if module in EXTRA_OF else None


def needed(args: argparse.Namespace) -> list[str]:
    """The extras' modules a parsed command will import: checked before it starts, so that a
    long command does not fail at its end (a plot after a sweep)."""
    command = getattr(args, "command", None)
    modules = {"sim": ["numba"], "aggregate": ["scipy"]}.get(command, [])
    plots = getattr(args, "plot", None) and (command == "sim" or getattr(args, "bench_command", None) == "report")
    return modules + (["matplotlib"] if plots else [])


def check(args: argparse.Namespace) -> None:
    """MissingExtraError (one line: what to install) for the first module of needed(args) absent."""
    for module in needed(args):
        try:
            importlib.import_module(module)
        except ImportError:
            what = f"moeedge {args.command}" + (" --plot" if module == "matplotlib" else "")
            raise MissingExtraError(install_hint(module, what)) from None
