"""Progress bars for the commands that take time: tqdm on stderr, shown only on a terminal
(a pipe or a log file gets none) and never with --quiet."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on stderr; disabled unless show and stderr is a terminal."""
    return tqdm(iterable, disable=None if show else True, file=sys.stderr, **kwargs)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
