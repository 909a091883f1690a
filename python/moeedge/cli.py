"""The `moeedge` command. Bad input exits with status 2 and one line on stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from moeedge import __version__
from moeedge.units import format_bytes, parse_bytes


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_bench_io(args: argparse.Namespace) -> int:
    from moeedge.iobench import measure_io

    if not os.path.isdir(args.dir):
        raise UsageError(f"--dir {args.dir!r} is not a directory")
    if not os.access(args.dir, os.W_OK):
        raise UsageError(f"--dir {args.dir!r} is not writable")
    if args.expert_bytes <= 0 or args.file_bytes < args.expert_bytes:
        raise UsageError(f"--file-bytes ({args.file_bytes}) must hold at least one expert of "
                         f"--expert-bytes ({args.expert_bytes}), and both must be positive")
    free = os.statvfs(args.dir).f_bavail * os.statvfs(args.dir).f_frsize
    if args.file_bytes > free // 2:
        raise UsageError(f"--file-bytes {format_bytes(args.file_bytes)} is more than half the free space "
                         f"in {args.dir} ({format_bytes(free)})")
    report = measure_io(args.dir, args.file_bytes, args.expert_bytes)
    if args.json:
        print(json.dumps(asdict(report)))
        return 0

    def show(gbps: float | None) -> str:
        return "refused" if gbps is None else f"{gbps:6.2f} GB/s"

    print(f"cold reads of {format_bytes(report.file_bytes)} in {args.dir}, "
          f"experts of {format_bytes(report.expert_bytes)}:")
    print(f"  sequential 4 MiB, O_DIRECT (ceiling)  {show(report.sequential_direct_gbps)}")
    print(f"  sequential 4 MiB, buffered            {show(report.sequential_buffered_gbps)}")
    print(f"  expert cache, O_DIRECT                {show(report.cache_direct_gbps)}")
    print(f"  expert cache, buffered                {show(report.cache_buffered_gbps)}")
    if report.direct_io_fallback:
        print(f"  note: {report.direct_io_fallback}")
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    from moeedge._core import cpu_features

    flags = [name for name, present in cpu_features().items() if present]
    print(f"moeedge {__version__}; CPU features: {', '.join(flags) or 'none detected'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeedge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    version = sub.add_parser("version", help="version and the CPU features moeedge detected")
    version.set_defaults(run=_cmd_version)

    bench = sub.add_parser("bench", help="measure this machine")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    io = bench_sub.add_parser("io", help="cold read throughput of the disk and of the expert cache")
    io.add_argument("--dir", default="/var/tmp", help="where to write the scratch file (default /var/tmp)")
    io.add_argument("--file-bytes", type=_byte_count, default="512MiB", help="scratch file size (default 512MiB)")
    io.add_argument("--expert-bytes", type=_byte_count, default="8MiB", help="expert size (default 8MiB)")
    io.add_argument("--json", action="store_true", help="print one JSON object")
    io.set_defaults(run=_cmd_bench_io)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"moeedge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"moeedge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
