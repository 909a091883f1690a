"""The pytest-benchmark suites of two builds side by side: this checkout (as installed in the
running interpreter) against a base commit (by default the parent), built into its own
directory from a git worktree beside this checkout, the two run alternately on this machine,
round after round. Prints per benchmark the median time of each build and the ratio, and
flags a regression (this build slower than the base by more than --threshold).

    python bench/compare_suites.py                      # HEAD~1 against this checkout
    python bench/compare_suites.py --base main --rounds 5 -- bench/test_bench_kernels.py -k q8_0

Everything after `--` goes to pytest (default: every bench/test_bench_*.py). Both builds run
this checkout's benchmark files, so both are measured the same way; a benchmark that one build
cannot run is listed as missing. pytest-benchmark's saved runs are keyed by interpreter, not by
CPU, and the CPU varies between machines: a baseline is only meaningful measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import site
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def build_base(rev: str) -> Path:
    """The base commit's package, built once into <worktree>/.bench-build (a worktree beside
    this checkout, named by the commit); returns that directory, for PYTHONPATH."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree = ROOT.parent / f"{ROOT.name}-bench-{sha[:12]}"
    target = tree / ".bench-build"
    if (target / "moeedge").is_dir():
        return target
    if not tree.exists():
        git("worktree", "add", "--detach", str(tree), sha)
    isolation = [] if importlib.util.find_spec("scikit_build_core") is None else ["--no-build-isolation"]
    print(f"building {rev} ({sha[:12]}) into {target} ...", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target",
                        str(target), str(tree)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"building {rev} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return target


def run_suite(build: str, pythonpath: Path | None, pytest_args: list[str], out: Path) -> dict[str, float]:
    """One run of the suites; benchmark name -> median seconds."""
    env, python = dict(os.environ), [sys.executable]
    if pythonpath is not None:
        # -S: no site processing, so an editable install's import hook (a .pth file) cannot
        # shadow the base build; the site-packages directories are on the path by hand instead.
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *site.getsitepackages()])
        python.append("-S")
    which = subprocess.run([*python, "-c", "import moeedge; print(moeedge.__file__)"], env=env,
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    if pythonpath is not None and not which.startswith(str(pythonpath)):
        raise SystemExit(f"the base build is not the one imported: {which or 'import failed'}")
    r = subprocess.run([*python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                        f"--benchmark-json={out}", *pytest_args], env=env, cwd=ROOT, capture_output=True,
                       text=True)
    if not out.exists():
        raise SystemExit(f"{build}: pytest wrote no benchmark results (exit {r.returncode}):\n{r.stdout[-3000:]}")
    if r.returncode != 0:
        print(f"{build}: some benchmarks failed (exit {r.returncode}); they are left out", file=sys.stderr)
    return {b["fullname"]: b["stats"]["median"] for b in json.loads(out.read_text())["benchmarks"]}


def compare(runs: dict[str, list[dict[str, float]]], threshold: float) -> tuple[list[dict], list[str]]:
    """Per benchmark: each build's median over its runs, new / base, and whether it regressed."""
    rows, regressions = [], []
    names = sorted({n for build in runs.values() for run in build for n in run})
    for name in names:
        base = [run[name] for run in runs["base"] if name in run]
        new = [run[name] for run in runs["new"] if name in run]
        if not base or not new:
            rows.append({"name": name, "missing": "base" if not base else "new"})
            continue
        ratio = statistics.median(new) / statistics.median(base)
        regressed = ratio > 1 + threshold
        rows.append({"name": name, "base_s": statistics.median(base), "new_s": statistics.median(new),
                     "new_over_base": ratio, "regressed": regressed})
        if regressed:
            regressions.append(name)
    return rows, regressions


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="bench/compare_suites.py", description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each build, alternating (default 3)")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="flag a benchmark whose median time grew by more than this (default 0.10)")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args(argv[:split])
    if args.rounds < 1 or args.threshold <= 0:
        parser.error("--rounds must be >= 1 and --threshold > 0")
    pytest_args = argv[split + 1:] or sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("test_bench_*.py"))
    target = build_base(args.base)
    runs: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for build in (("base", "new") if i % 2 == 0 else ("new", "base")):  # neither always goes first
                out = Path(tmp) / f"{build}-{i}.json"
                runs[build].append(run_suite(build, target if build == "base" else None, pytest_args, out))
                print(f"round {i + 1} {build}: {len(runs[build][-1])} benchmarks", file=sys.stderr, flush=True)
    rows, regressions = compare(runs, args.threshold)
    width = max((len(r["name"]) for r in rows), default=10)
    print(f"{'benchmark':<{width}}  {'base':>10}  {'new':>10}  new/base")
    for r in rows:
        if "missing" in r:
            print(f"{r['name']:<{width}}  missing in the {r['missing']} build")
        else:
            flag = "  REGRESSION" if r["regressed"] else ""
            print(f"{r['name']:<{width}}  {r['base_s'] * 1e6:>8.1f}us  {r['new_s'] * 1e6:>8.1f}us  "
                  f"{r['new_over_base']:.3f}{flag}")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "rounds": args.rounds, "rows": rows}, indent=1))
    print(f"{len(regressions)} of {len(rows)} slower by more than {args.threshold:.0%}", file=sys.stderr)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
