"""A lean install: run, chat and serve need no scipy, numba or matplotlib; a command
that needs an extra that is missing says which to install (exit 2, one line)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moeedge import __version__, extras

ROOT = Path(__file__).resolve().parent.parent
BLOCK = "import sys\nfor m in {modules!r}: sys.modules[m] = None  # as if not installed\n"
OPTIONAL = ("scipy", "numba", "llvmlite", "matplotlib", "llama_cpp", "accelerate")


def python(code: str, *modules: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(modules=modules or OPTIONAL) + code],
                          capture_output=True, text=True, timeout=120)


def test_the_base_path_imports_no_optional_module():
    run = python("import moeedge, moeedge.api, moeedge.cli, moeedge.chat_cli\n"
                 "sys.exit(moeedge.cli.main(['--help']))")
    assert run.returncode == 0, run.stderr
    assert "usage: moeedge" in run.stdout


def test_run_works_without_the_extras():
    run = python("import moeedge.cli\nsys.exit(moeedge.cli.main(['run', '--prompt', 'def f(x):', "
                 "'--max-new-tokens', '4', '--memory-budget', '1GiB', '--seed', '1']))")
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("args, module, extra", [
    (["aggregate", "--method", "merge", "--experts-per-layer", "4", "-o", "/tmp/never-written"], "scipy", "aggregate"),
    (["sim", "/no/such/trace.npz"], "numba", "sim"),
    (["bench", "report", "--plot", "/tmp/plots"], "matplotlib", "plot"),
])
def test_a_command_without_its_extra_says_what_to_install(args, module, extra):
    run = python(f"import moeedge.cli\nsys.exit(moeedge.cli.main({args!r}))", module)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        f"moeedge: error: moeedge {args[0]}{' --plot' if module == 'matplotlib' else ''} needs {module}, which the "
        f"base install leaves out: pip install 'moeedge[{extra}]'"]


def test_a_late_import_of_an_extra_is_explained_too(monkeypatch, capsys):
    from moeedge import cli

    def needs_llama_cpp(args):
        import llama_cpp  # noqa: F401
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setattr(cli, "_cmd_version", needs_llama_cpp)
    assert cli.main(["version"]) == 2
    assert capsys.readouterr().err == ("moeedge: error: this command needs llama_cpp, which the base install leaves "
                                       "out: pip install 'moeedge[bench]'\n")


def test_another_import_error_is_not_hidden():
    assert extras.explain(ImportError("x", name="no_such_module")) is None


def test_base_dependencies_leave_the_extras_out_and_test_keeps_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not names & {"scipy", "numba", "matplotlib", "transformers"}
    extras_ = project["optional-dependencies"]
    assert {"aggregate", "sim", "plot", "bench", "all", "test"} <= extras_.keys()
    for needed in ("scipy", "numba", "matplotlib", "transformers"):
        assert any(d.startswith(needed) for d in extras_["test"]) and any(d.startswith(needed) for d in extras_["all"])
    assert project["requires-python"] == ">=3.11"  # tomllib


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag(flag):
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", flag], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == f"moeedge {__version__}\n"
