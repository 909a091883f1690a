"""`moeedge serve` under concurrent load: greedy answers decoded together equal each one
decoded alone (the multi-sequence step is batch-invariant), 8 clients x 20 requests end
without an error and the process stays under its memory budget, and SIGTERM lets the
request in flight finish before the process exits 0."""
from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import serve_fixtures as sf
from moeedge.units import parse_bytes

BUDGET = "420MiB"
PROMPTS = ["the quick brown fox", "hello world, how are", "experts route tokens", "a cache keeps hot"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = sf.shared_checkpoint(tmp_path_factory)
    s = sf.start(ckpt, tmp_path_factory.mktemp("logs") / "load.log", "--memory-budget", BUDGET,
                 "--max-batch", "8", "--max-queue", "64")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _greedy(client, prompt: str) -> str:
    return client.completions.create(model="m", prompt=prompt, max_tokens=32, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_concurrent_greedy_answers_equal_each_alone(server, client):
    alone = [_greedy(client, p) for p in PROMPTS]
    steps = sf.metric(server, "moeedge_decode_steps_total")
    tokens = sf.metric(server, "moeedge_generated_tokens_total")
    start = threading.Barrier(len(PROMPTS))

    def together(prompt):
        start.wait()
        return _greedy(client, prompt)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(together, PROMPTS)) == alone
    # they were decoded together: fewer steps than tokens
    assert sf.metric(server, "moeedge_decode_steps_total") - steps < \
        sf.metric(server, "moeedge_generated_tokens_total") - tokens


@pytest.mark.slow
def test_eight_clients_twenty_requests_each_under_the_budget(server, client):
    def one_client(i: int) -> int:
        n = 0
        for j in range(20):
            prompt = PROMPTS[(i + j) % len(PROMPTS)] + f" {j}"
            if j % 2:
                r = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0.8, seed=i * 100 + j)
                n += r.usage.completion_tokens
            else:
                chunks = list(client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0,
                    stream=True, stream_options={"include_usage": True}))
                assert chunks[-1].usage is not None
                n += chunks[-1].usage.completion_tokens
        return n

    with ThreadPoolExecutor(8) as pool:
        generated = sum(pool.map(one_client, range(8)))
    assert generated > 0
    assert sf.metric(server, 'moeedge_requests_total{outcome="error"}') == 0
    assert sf.metric(server, "moeedge_active_sequences") == 0
    assert server.peak_rss() < parse_bytes(BUDGET), f"peak RSS {server.peak_rss()} over the budget {BUDGET}"


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    stream = sf.open_stream(server, "/v1/completions", body)
    assert stream.readline().startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    rest = stream.read().decode()
    assert '"finish_reason": "length"' in rest and rest.strip().endswith("data: [DONE]")
    assert server.proc.wait(30) == 0
    with pytest.raises(OSError):
        sf.get(server, "/health")
