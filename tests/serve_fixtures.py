"""`moeedge serve` started as a real process on a free loopback port, for the server tests."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tiny_checkpoints import make_decoder, write_tokenizer

START_S = 90.0  # the machine is shared: a start (torch, the model) can take a while
CONTEXT = 1024


_made: dict[str, Path] = {}


def shared_checkpoint(tmp_path_factory) -> Path:
    """One tiny checkpoint for every server test module of the session (writing one imports
    transformers: seconds)."""
    if "tiny" not in _made:
        _made["tiny"] = tiny_served_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-mixtral")
    return _made["tiny"]


def tiny_served_checkpoint(directory: Path) -> Path:
    """A tiny chat-ready Mixtral whose config allows CONTEXT positions (rotary: any)."""
    directory.mkdir(parents=True, exist_ok=True)
    make_decoder(directory, "mixtral", seed=4)
    write_tokenizer(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeedge serve exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if get(self, "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"moeedge serve did not start in {START_S} s: {self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def peak_rss(self) -> int:
        """The process's peak resident bytes so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")


def start(checkpoint: Path, log: Path, *args: str) -> Server:
    """Start (not wait for) a server: several can load side by side, then wait_ready()."""
    port = free_port()
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moeedge.cli", "serve", str(checkpoint), "--port", str(port),
                             "--max-context", str(CONTEXT), "--threads", "1", *args],
                            stdout=out, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if k != "MOEEDGE_API_KEY"})
    return Server(proc, port, log)


def request(server: Server, method: str, path: str, body=None, headers: dict | None = None,
            raw: bytes | None = None):
    """(status, headers (case-insensitive), parsed JSON or text) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, hdrs, payload = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, payload = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(payload)
    except ValueError:
        return status, hdrs, payload.decode()


def get(server: Server, path: str, headers: dict | None = None):
    return request(server, "GET", path, headers=headers)[::2]


def open_stream(server: Server, path: str, body: dict, headers: dict | None = None) -> http.client.HTTPResponse:
    """A streaming request left open: read its lines, or close it to disconnect."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **(headers or {})})
    return conn.getresponse()


def metric(server: Server, name: str, headers: dict | None = None) -> float:
    """One sample of /metrics, by its name with labels (0 when absent)."""
    status, text = get(server, "/metrics", headers)
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
