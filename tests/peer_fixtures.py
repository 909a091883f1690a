"""`moeedge serve-experts` in a subprocess for the peer tests: started, its address read from
its output, stopped (or killed) by its own pid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

START_S = 90.0  # bound on a peer's start (DHT, pools, handler, experts): never a timing assertion


class PeerProcess:
    def __init__(self, *args: str, prefix: tuple[str, ...] = ()):
        """prefix: a command that runs the peer elsewhere (ip netns exec NS)."""
        self.args = args
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "moeedge.cli", "serve-experts", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)  # its helpers share its process group
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("/ip4/"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_S) or not self.address:
            self.stop()
            raise RuntimeError(f"serve-experts did not start: {self.lines} {self.proc.stderr.read()[-2000:]}")

    @property
    def address(self) -> str | None:
        return next((line for line in self.lines if line.startswith("/ip4/")), None)

    @property
    def port(self) -> int:
        return int(self.address.split("/")[4])

    def kill(self) -> None:
        """As a device that drops out: every process of its group, at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # whatever it left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode
