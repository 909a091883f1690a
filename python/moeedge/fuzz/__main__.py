"""python -m moeedge.fuzz: run a seeded fuzz campaign and print its outcome table.

Exit status 0 when every input ended in success or one clean error, 1 when any ended in
crash, hang, traceback, oom, wrong output or escape (their inputs are written under
--failures), 2 for bad flags."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moeedge.fuzz.campaign import Config, format_table, run_campaign
from moeedge.fuzz.classes import CLASS_NAMES, LETTERS

LONG_COUNT = 5000


def _classes(text: str) -> tuple[str, ...]:
    names = tuple(LETTERS.get(part.strip(), part.strip()) for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown class {', '.join(unknown) or text!r}; choose from "
                                         f"{', '.join(f'{k} ({v})' for k, v in LETTERS.items())}")
    return names


def _replay(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for part in text.split(","):
        cls, _, index = part.strip().rpartition(":")
        cls = LETTERS.get(cls, cls)
        if cls not in CLASS_NAMES or not index.isdigit():
            raise argparse.ArgumentTypeError(f"--replay takes CLASS:INDEX[,CLASS:INDEX...], e.g. template:17; "
                                             f"got {part!r}")
        out.append((cls, int(index)))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moeedge.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same inputs (default 0)")
    p.add_argument("--count", type=int, default=None,
                   help=f"inputs, spread evenly over the classes (default 300; {LONG_COUNT} with --long)")
    p.add_argument("--long", action="store_true", help=f"the long run: --count {LONG_COUNT} unless given")
    p.add_argument("--classes", type=_classes, default=CLASS_NAMES,
                   help=f"comma-separated, by name or letter: {', '.join(f'{k}={v}' for k, v in LETTERS.items())}")
    # Above moeedge's own limits: a chat input renders its template twice, each under a 5 s deadline.
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per input before it is a hang (default 30)")
    p.add_argument("--memory", type=int, default=768, metavar="MiB",
                   help="each child's memory cgroup limit; the model's memory_budget is what the child holds "
                        "plus half of it (default 768)")
    p.add_argument("--jobs", type=int, default=1, help="children at a time (default 1)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the logits comparison with transformers / gguf")
    p.add_argument("--failures", type=Path, default=Path("fuzz-failures"),
                   help="where the inputs of bad outcomes are written (default ./fuzz-failures)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the summary and every input's record")
    p.add_argument("--replay", type=_replay, default=(), metavar="CLASS:INDEX,...",
                   help="run just these inputs of --seed (as listed in a failure's input.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per input")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count = args.count if args.count is not None else LONG_COUNT if args.long else 300
    if count < 1 or args.timeout <= 0 or args.memory < 64 or args.jobs < 1:
        print("python -m moeedge.fuzz: error: --count and --jobs must be positive, --timeout above 0, "
              "--memory at least 64", file=sys.stderr)
        return 2
    config = Config(seed=args.seed, count=count, classes=args.classes, timeout=args.timeout, memory_mib=args.memory,
                    jobs=args.jobs, reference=args.reference, failures=args.failures, replay=args.replay)

    def progress(record, done: int) -> None:
        if args.verbose or args.replay:
            print(f"{record.name:<16} {record.target:<8} {record.outcome:<12} {record.seconds:6.2f}s  "
                  f"{record.description[:90]}" + (f"\n    {record.detail}" + (f" [{record.exception}: "
                  f"{record.message[:120]} at {record.where or record.raised_at}]" if record.exception else "")
                  if args.replay else ""), flush=True)
        elif done % 100 == 0:
            print(f"... {done} inputs", file=sys.stderr, flush=True)

    summary = run_campaign(config, progress)
    print(format_table(summary))
    print(f"{len(summary.records)} inputs in {summary.seconds:.1f} s: {summary.inputs_per_second:.1f} inputs/s; "
          f"memory limit per child {args.memory} MiB by {summary.limit}")
    if summary.limit_note:
        print(f"note: {summary.limit_note}")
    failures = summary.distinct_failures()
    if failures:
        print(f"\n{len(summary.bad)} bad outcomes, {len(failures)} distinct; inputs under {args.failures}/:")
        for f in failures:
            print(f"  [{f['class']}] {f['outcome']}: {f['exception'] or '-'} at {f['where']} (x{f['count']}, "
                  f"e.g. {f['examples'][0]}: {f['description'][:100]})")
    if args.json:
        args.json.write_text(json.dumps(summary.as_dict(), indent=1, default=str) + "\n")
    return 1 if summary.bad else 0


if __name__ == "__main__":
    sys.exit(main())
