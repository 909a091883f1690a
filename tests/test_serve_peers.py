"""`moeedge serve --peer`: the server's decode steps of several sequences send missing
experts to a `moeedge serve-experts` peer on loopback, and its answers equal a server's
without one; the flag reaches load() from the command line; a bad deadline is refused."""
from __future__ import annotations

import queue
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("hivemind", reason='the peer tier needs hivemind: pip install "moeedge[peers]"')
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

sys.path.insert(0, str(Path(__file__).parent))
from peer_fixtures import PeerProcess  # noqa: E402
from serve_fixtures import request, shared_checkpoint, start  # noqa: E402

import moeedge  # noqa: E402
from moeedge.peers import remote as remote_module  # noqa: E402
from moeedge.runtime.sampling import SamplingParams  # noqa: E402
from moeedge.serve.engine import Engine, Job  # noqa: E402

PROMPTS = [list(range(3, 30)), list(range(40, 52)), list(range(60, 75))]
TOKENS = 8
WAIT_S = 120.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def peer(tiny):
    p = PeerProcess(str(tiny), "--memory-budget", "2GiB", "--experts", "auto", "--max-rows", "8")
    yield p
    p.stop()


def served_together(tiny, peers) -> tuple[list[list[str]], dict | None]:
    """Every prompt's greedy pieces, the prompts submitted at once to an engine whose cache
    holds two experts (most a step needs are missing); the peer counters, if any."""
    with moeedge.load(tiny, memory_budget="min", n_sequences=len(PROMPTS), peers=peers) as m:
        store = m.cache.store
        m.cache.set_budget(2 * store.slot_bytes(store.keys()[0]))
        engine = Engine(m, len(PROMPTS), 0)
        try:
            inboxes = []
            for ids in PROMPTS:
                inbox: queue.Queue = queue.Queue()
                engine.submit(Job(list(ids), SamplingParams(temperature=0.0), TOKENS, [], inbox.put, ignore_eos=True))
                inboxes.append(inbox)
            answers = []
            for inbox in inboxes:
                pieces = []
                while True:
                    event = inbox.get(timeout=WAIT_S)
                    assert event.error is None, event.error
                    if event.finish_reason:
                        assert event.finish_reason == "length" and event.completion_tokens == TOKENS
                        break
                    pieces.append(event.text)
                answers.append(pieces)
            steps = engine.snapshot()["decode_steps"]
        finally:
            engine.close()
        assert steps < len(PROMPTS) * TOKENS   # the sequences were decoded together
        remote = getattr(m.runner, "remote", None)
        return answers, (dict(remote.counters) if remote is not None else None)


def test_the_engine_with_a_peer_answers_as_without(tiny, peer, monkeypatch):
    want, none = served_together(tiny, None)
    assert none is None
    # a disk this slow makes every call to a live peer the cheaper choice
    monkeypatch.setattr(remote_module, "disk_bandwidth", lambda stats: 1.0)
    got, counters = served_together(tiny, [peer.address])
    assert got == want
    assert counters["sent"] > 0 and counters["computed_here_after_failure"] == 0


def test_serve_takes_peer_flags_and_shows_the_peer_in_metrics(tiny, peer, tmp_path):
    server = start(tiny, tmp_path / "serve.log", "--max-batch", "2", "--peer", peer.address,
                   "--peer-deadline", "5").wait_ready()
    try:
        status, _, body = request(server, "POST", "/v1/completions",
                                  {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        # the family is there only when load() got the peer: its counters by where experts ran
        _, text = request(server, "GET", "/metrics")[::2]
        assert 'moeedge_peer_experts_total{where="sent"}' in text, text
    finally:
        assert server.stop() == 0


def test_a_bad_peer_deadline_is_refused_in_one_line(tiny):
    r = subprocess.run([sys.executable, "-m", "moeedge.cli", "serve", str(tiny), "--peer", "/ip4/127.0.0.1/tcp/1",
                        "--peer-deadline", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--peer-deadline must be positive" in r.stderr, r.stderr
