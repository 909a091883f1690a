"""The long fuzz run: 5000 inputs (default) over every class, then a markdown report.

    python bench/fuzz_long.py [--seed 0] [--count 5000] [--jobs 2] [--timeout 30] [--out DIR]
    python bench/fuzz_long.py --report-only DIR/fuzz-seed0.json   # the markdown again, from the records

Writes under DIR (default /var/tmp/moeedge-fuzz-long): fuzz-seedS.json (the summary and
every input's record), failures/ (up to 5 inputs per distinct failure, each with its
input.json and the command that replays it) and fuzz-seedS.md (the outcome table per
class and the distinct failures, each with its count and an example). Exit status as
`python -m moeedge.fuzz`: 1 when any input ended badly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeedge.fuzz.__main__ import main as fuzz_main
from moeedge.fuzz.campaign import Summary


def markdown(data: dict) -> str:
    summary = Summary.from_dict(data).as_dict()  # failures grouped as this version groups them
    cfg = summary["config"]
    lines = [f"# moeedge.fuzz: seed {cfg['seed']}, {sum(r['tried'] for r in summary['table'].values())} inputs",
             "", f"{summary['seconds']:.0f} s, {summary['inputs_per_second']:.2f} inputs/s with {cfg['jobs']} "
             f"job(s); timeout {cfg['timeout']} s, {cfg['memory_mib']} MiB per child by {summary['limit']}", ""]
    columns = list(next(iter(summary["table"].values())))
    lines += ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {cls} | " + " | ".join(str(row[c]) for c in columns) + " |" for cls, row in summary["table"].items()]
    lines += ["", "## Distinct failures", "", "| class | outcome | exception | where | count | example |",
              "|---|---|---|---|---|---|"]
    for f in summary["distinct_failures"]:
        example = f"`{f['examples'][0]}`: {f['description'][:100]}".replace("|", "\\|")
        where = f["where"].replace("|", "\\|")
        lines.append(f"| {f['class']} | {f['outcome']} | {f['exception'] or '-'} | {where} | {f['count']} | "
                     f"{example} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", type=Path, default=Path("/var/tmp/moeedge-fuzz-long"))
    p.add_argument("--report-only", type=Path, metavar="JSON", help="write the markdown of an earlier run's --json")
    args = p.parse_args()
    if args.report_only:
        report = args.report_only.with_suffix(".md")
        report.write_text(markdown(json.loads(args.report_only.read_text())))
        print(f"report: {report}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"fuzz-seed{args.seed}.json"
    status = fuzz_main(["--seed", str(args.seed), "--count", str(args.count), "--jobs", str(args.jobs),
                        "--timeout", str(args.timeout), "--failures", str(args.out / "failures"), "--json", str(out)])
    if out.is_file():
        report = args.out / f"fuzz-seed{args.seed}.md"
        report.write_text(markdown(json.loads(out.read_text())))
        print(f"report: {report}")
    return status


if __name__ == "__main__":
    sys.exit(main())
