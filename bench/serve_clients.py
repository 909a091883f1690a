"""What bench/serve_load.py and bench/serve_compare.py share: a server process started in a
memory cgroup of its own (moeedge serve, llama-server, llama_cpp.server: any command that
answers OpenAI's API), N concurrent streaming clients against it, and the figures of a
round (aggregate tokens/s, time to first token, time between tokens), summarized as
medians over rounds.

Every request is a greedy streaming /v1/completions of `tokens` tokens that does not stop at
end of sequence: `ignore_eos` (moeedge, llama-server) and `min_tokens` (llama_cpp.server);
a server ignores the field it does not know. Its tokens are the usage the server reports,
else max_tokens when it finished for length, else its chunks."""
from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path


def held_out_prompts(n: int, chars: int) -> list[str]:
    """n openings of different held-out source files of the default model's corpus."""
    from moeedge.data.corpus import collect

    texts = [t for t in collect().texts("heldout") if len(t) > chars]
    if len(texts) < n:
        raise ValueError(f"only {len(texts)} held-out texts are longer than {chars} characters; {n} asked")
    random.Random(0).shuffle(texts)
    return [t[:chars] for t in texts[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command on a free loopback port ({port} in cmd), optionally alone in a memory
    cgroup limited to limit_bytes (its peak usage read at the end); ready when `health`
    answers 200."""

    def __init__(self, cmd: list[str], port: int, log: str, limit_bytes: int | None = None,
                 health: str = "/health", env: dict | None = None, start_s: float = 900):
        self.port = port
        self.cgroup = None
        if limit_bytes is not None:
            from moeedge.cgroup import own_memory_cgroup

            parent, version = own_memory_cgroup()
            self.cgroup = parent / f"moeedge-bench-{uuid.uuid4().hex[:8]}"
            self.cgroup.mkdir()
            (self.cgroup / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(str(limit_bytes))
            self.peak_file = self.cgroup / ("memory.max_usage_in_bytes" if version == 1 else "memory.peak")
            cmd = ["sh", "-c", f'echo $$ > "{self.cgroup / "cgroup.procs"}" && exec "$@"', "sh", *cmd]
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_s
        while not self._answers(health):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start (exit {self.proc.poll()}): see {log}")
            time.sleep(0.5)

    def _answers(self, path: str) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5).status == 200
        except OSError:
            return False

    def peak_bytes(self) -> int | None:
        return int(self.peak_file.read_text()) if self.cgroup else None

    def oom_kills(self) -> int:
        from moeedge.cgroup import oom_kills

        return oom_kills(self.cgroup) if self.cgroup else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.cgroup is not None:
            from moeedge.cgroup import remove_cgroup

            remove_cgroup(self.cgroup)


# -- clients ---------------------------------------------------------------------------
def stream_once(port: int, prompt: str, tokens: int, out: dict, ignore_eos: bool = True) -> None:
    """One streaming completion; out gets its send time, its chunks' times and its tokens."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body.update(ignore_eos=True, min_tokens=tokens)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    out["sent"] = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        out["error"] = f"{r.status} {r.read()[:200]!r}"
        return
    chunks, finish, usage = [], None, None
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        event = json.loads(line[6:])
        if "error" in event:
            out["error"] = event["error"]["message"] if isinstance(event["error"], dict) else str(event["error"])
            return
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            if choice.get("text"):
                chunks.append(now)
            finish = choice.get("finish_reason") or finish
    conn.close()
    if not chunks or finish is None:
        out["error"] = "no text came back" if not chunks else "the stream ended without a finish_reason"
        return
    out["chunks"] = chunks
    out["tokens"] = usage["completion_tokens"] if usage else tokens if finish == "length" else len(chunks)


def run_clients(port: int, prompts: list[str], tokens: int) -> dict:
    """One round: every prompt sent at once, each by a client thread of its own."""
    outs = [{} for _ in prompts]
    threads = [threading.Thread(target=stream_once, args=(port, p, tokens, o)) for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    generated = sum(o["tokens"] for o in outs)
    wall = max(o["chunks"][-1] for o in outs) - min(o["sent"] for o in outs)
    return {"streams": len(prompts), "generated": generated, "aggregate_tok_s": generated / wall,
            "ttft": [o["chunks"][0] - o["sent"] for o in outs],
            "gaps": [b - a for o in outs for a, b in zip(o["chunks"], o["chunks"][1:])]}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds of the rates; percentiles over every round's requests and gaps."""
    ttft = [t for r in rounds for t in r["ttft"]]
    gaps = [g for r in rounds for g in r["gaps"]]
    return {"streams": rounds[0]["streams"], "rounds": len(rounds),
            "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in rounds),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "between_tokens_p99_s": percentile(gaps, 0.99),
            "all_aggregate_tok_s": [round(r["aggregate_tok_s"], 2) for r in rounds]}


def report(results: dict, path: str | None) -> int:
    """Print the results as JSON, and write them to path too where one is given."""
    text = json.dumps(results, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)
    return 0


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
