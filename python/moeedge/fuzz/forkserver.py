"""Run one input in a forked child of this process, which has already imported torch,
transformers and moeedge: a fork costs milliseconds where a fresh interpreter costs
seconds. The child joins a memory limit, runs a target, and reports JSON lines through
a pipe; the parent enforces the wall-clock timeout and reads the wait status.

The parent must never have run torch compute or started threads before forking (a
child of a process whose OpenMP pool exists can deadlock): seed checkpoints are built
in a child too (moeedge.fuzz.seeds).
"""
from __future__ import annotations

import json
import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from moeedge.fuzz.limits import MemoryLimit
from moeedge.fuzz.outcomes import CRASH, HANG, OOM, TRACEBACK

Report = Callable[[dict], None]
# A target runs in the child: it may report(...) stages along the way and returns the
# final {"outcome": ..., "detail": ...}.
Target = Callable[[Report], dict]
HARNESS_ERROR = 70  # the child's exit status when the target itself failed (EX_SOFTWARE)


@dataclass
class ChildResult:
    outcome: str
    detail: str
    seconds: float
    messages: list[dict] = field(default_factory=list)  # what the child reported, in order
    final: dict = field(default_factory=dict)           # its last report (empty: none arrived)


class Child:
    """A forked child running target; poll it with read() and finished(), then result()."""

    def __init__(self, target: Target, timeout: float, limit: MemoryLimit, output: str | None = None,
                 cwd: str | None = None):
        self.limit = limit
        self.oom_before = limit.oom_kills()
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.timeout = timeout
        self._buf = b""
        self.eof = False
        self.status: int | None = None
        self.killed = False
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(r)
            _child_main(target, w, limit, output, cwd)
        os.close(w)
        self.pid, self.fd = pid, r
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        except OSError:
            pass

    def fileno(self) -> int:
        return self.fd

    def read(self) -> None:
        """Read what is there (call when select says the pipe is readable)."""
        chunk = os.read(self.fd, 1 << 16)
        if chunk:
            self._buf += chunk
        else:
            self.eof = True

    def finished(self) -> bool:
        """True once the child has exited (reaped) or run past its deadline (then killed and reaped)."""
        if self.status is not None:
            return True
        if self.eof:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                self._kill_group()  # anything it left behind (a template's background command)
                return True
        if time.monotonic() >= self.deadline:
            self.killed = True
            self._kill_group()
            _, self.status = os.waitpid(self.pid, 0)
            return True
        return False

    def _kill_group(self) -> None:
        for kill, target in ((os.killpg, self.pid), (os.kill, self.pid)):
            try:
                kill(target, signal.SIGKILL)
                return
            except ProcessLookupError:
                continue
            except PermissionError:
                return

    def result(self) -> ChildResult:
        os.close(self.fd)
        seconds = time.monotonic() - self.start
        messages = []
        for line in self._buf.decode("utf-8", "replace").splitlines():
            try:
                messages.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by the kill
        final = next((m for m in reversed(messages) if m.get("final")), {})
        # A stage the code under test finished before the reference ran: its outcome stands
        # whatever the reference then did (hung, crashed, ran out of memory).
        staged = next((m for m in reversed(messages) if m.get("stage") == "moeedge"), None)
        status = self.status
        if self.killed:
            if staged:
                return ChildResult(staged["outcome"], staged.get("detail", "") + "; the reference did not finish "
                                   f"in {self.timeout:g} s", seconds, messages, staged)
            return ChildResult(HANG, f"still running after {self.timeout:g} s", seconds, messages, final)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGKILL and self.limit.oom_kills() > self.oom_before:
                outcome, detail = OOM, f"killed by the OOM killer of its {self.limit.kind} limit"
            else:
                outcome, detail = CRASH, f"killed by {signal.Signals(sig).name}"
            if staged:
                return ChildResult(staged["outcome"], staged.get("detail", "") + f"; then the reference was {detail}",
                                   seconds, messages, staged)
            return ChildResult(outcome, detail, seconds, messages, final)
        code = os.WEXITSTATUS(status)
        if final and code == 0:
            return ChildResult(final["outcome"], final.get("detail", ""), seconds, messages, final)
        if final and code == HARNESS_ERROR:
            return ChildResult(TRACEBACK, final.get("detail", ""), seconds, messages, final)
        return ChildResult(CRASH, f"exited with status {code} without a result", seconds, messages, final)


def _child_main(target: Target, w: int, limit: MemoryLimit, output: str | None, cwd: str | None) -> None:
    code = 0

    def report(message: dict) -> None:
        data = (json.dumps(message, default=str) + "\n").encode()
        while data:
            data = data[os.write(w, data):]

    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills whatever it started too
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if output:  # the code under test's prints and warnings, kept apart from the fuzzer's
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        if cwd:
            os.chdir(cwd)
        limit.enter()
        report({"final": True, **target(report)})
    except BaseException as e:  # noqa: BLE001 -- the target is supposed to catch everything it runs
        code = HARNESS_ERROR
        try:
            report({"final": True, "outcome": TRACEBACK, "detail": f"the harness failed: {type(e).__name__}: {e}"[:500]})
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def wait_all(children: list[Child]) -> None:
    """Block until every child has finished (for a single run; the campaign polls instead)."""
    while True:
        live = [c for c in children if not c.finished()]
        if not live:
            return
        readable = [c for c in live if not c.eof]
        timeout = max(0.0, min(c.deadline for c in live) - time.monotonic())
        if readable:
            ready, _, _ = select.select(readable, [], [], min(timeout, 0.05))
            for c in ready:
                c.read()
        else:
            time.sleep(min(timeout, 0.002))


def run_child(target: Target, timeout: float, limit: MemoryLimit, output: str | None = None,
              cwd: str | None = None) -> ChildResult:
    child = Child(target, timeout, limit, output, cwd)
    wait_all([child])
    return child.result()
