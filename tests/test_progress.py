"""Progress bars where commands take time: on stderr, on a terminal only, off with --quiet."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

TEXT = "def read_config(path):\n    with open(path) as f:\n        return f.read()\n" * 40


def on_terminal(args: list[str]) -> str:
    """stdout and stderr of `moeedge ARGS` run on a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # a terminal of 120 columns (a fresh pty has none, and tqdm then draws nothing)
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execv(sys.executable, [sys.executable, "-m", "moeedge.cli", *args])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    (d / "text.txt").write_text(TEXT)
    return {"trace": ["trace", "--text", str(d / "text.txt"), "-o", str(d / "t.npz"), "--memory-budget", "1GiB"],
            "evaluate": ["eval", "--text", str(d / "text.txt"), "--tokens", "300", "--window", "64"]}


@pytest.mark.parametrize("name", ["trace", "evaluate"])
def test_a_bar_on_a_terminal_none_with_quiet(commands, name):
    assert f"{name}: 100%" in on_terminal(commands[name])
    assert "100%" not in on_terminal([*commands[name], "--quiet"])


@pytest.mark.parametrize("name", ["trace", "evaluate"])
def test_no_bar_into_a_pipe(commands, name):
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", *commands[name]], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "%|" not in run.stderr
