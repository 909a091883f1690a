"""`moeedge bench matrix` and `moeedge bench report`. Only argparse at import."""
from __future__ import annotations

import json

from moeedge.progress import add_quiet
import sys
import argparse
from pathlib import Path


def add_bench_parsers(bench_sub) -> None:
    m = bench_sub.add_parser("matrix", help="engine x model x memory limit, each run cold in its own memory cgroup")
    m.add_argument("config", nargs="?", default="bench/matrix.toml", help="the matrix (default bench/matrix.toml)")
    m.add_argument("--results", default="bench/results", help="where records go (default bench/results)")
    m.add_argument("--models", default=None, help="comma-separated model names of the config to run")
    m.add_argument("--engines", default=None, help="comma-separated engines to run")
    m.add_argument("--cells", choices=("all", "decode", "prefill"), default="all",
                   help="only the decode cells, or only the prefill cells (a model's prefill_tokens; default all)")
    m.add_argument("--dry-run", action="store_true", help="list the runs and which are recorded already")
    add_quiet(m)
    m.set_defaults(run=_cmd_matrix)
    mm = bench_sub.add_parser("machine", help="measure this machine's facts for the bound (disk, matrix-vector)")
    mm.add_argument("--results", default="bench/results", help="write RESULTS/machine.json (default bench/results)")
    mm.add_argument("--dir", default="/var/tmp", help="where the disk probe's 1 GiB scratch file goes (the models' disk)")
    mm.add_argument("--threads", type=int, default=2)
    mm.set_defaults(run=_cmd_machine)
    r = bench_sub.add_parser("report", help="the recorded runs as a table, and plots")
    r.add_argument("--results", default="bench/results", help="where the records are (default bench/results)")
    r.add_argument("--commit", default=None, help="only records of this commit (a prefix)")
    r.add_argument("--plot", default=None, metavar="DIR", help="write a PNG per model here")
    r.add_argument("--refresh-bounds", action="store_true",
                   help="recompute every record's bound from RESULTS/machine.json first (after measuring it again)")
    r.set_defaults(run=_cmd_report)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _cmd_matrix(args: argparse.Namespace) -> int:

    from moeedge.cgroup import CgroupUnavailable
    from moeedge.harness.matrix import main_loop
    from moeedge.harness.report import table

    try:
        records = main_loop(Path(args.config), Path(args.results), _names(args.models), _names(args.engines),
                            dry_run=args.dry_run, progress=not args.quiet, cells=args.cells)
    except CgroupUnavailable as e:
        print(f"moeedge bench matrix: {e}", file=sys.stderr)
        return 2
    if records:
        print(table(records))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from moeedge.harness.matrix import refresh_bounds
    from moeedge.harness.report import load_records, plot, table

    if args.refresh_bounds:
        print(f"{refresh_bounds(Path(args.results))} records' bounds recomputed")
    records = load_records(Path(args.results), args.commit)
    if not records:
        raise ValueError(f"{args.results}: no records under runs/")
    print(table(records))
    if args.plot:
        for path in plot(records, Path(args.plot)):
            print(f"wrote {path}")
    return 0


def _cmd_machine(args: argparse.Namespace) -> int:

    from moeedge.harness.machine import measure

    facts = measure(Path(args.dir), args.threads)
    path = Path(args.results) / "machine.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts, indent=1))
    return 0
