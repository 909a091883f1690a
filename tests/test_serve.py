"""`moeedge serve` through the official openai client, against a server on loopback: the
answers equal the library's own (greedy, and sampled with a seed), streaming equals
non-streaming, stop strings, and every error in OpenAI's shape."""
from __future__ import annotations

import http.client
import json
import threading

import openai
import pytest

import serve_fixtures as sf
from moeedge.api import load

KEY = "test-key-123"
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return sf.shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def servers(ckpt, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    main = sf.start(ckpt, logs / "main.log", "--api-key", KEY, "--max-batch", "4", "--max-body", "64KiB")
    narrow = sf.start(ckpt, logs / "narrow.log", "--max-batch", "1", "--max-queue", "1")
    try:
        yield main.wait_ready(), narrow.wait_ready()
    finally:
        main.stop()
        narrow.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(ckpt):
    with load(ckpt, max_context=sf.CONTEXT) as model:
        yield model


AUTH = {"authorization": f"Bearer {KEY}"}


def test_models_lists_the_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["tiny-mixtral"]
    assert client.models.retrieve("tiny-mixtral").owned_by == "moeedge"
    with pytest.raises(openai.NotFoundError, match="tiny-mixtral"):
        client.models.retrieve("gpt-4")


def test_greedy_completion_equals_the_library(client, reference):
    r = client.completions.create(model="tiny-mixtral", prompt=PROMPT, max_tokens=20, temperature=0)
    assert r.choices[0].text == reference.generate(PROMPT, max_new_tokens=20, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_chat_equals_the_library(client, reference):
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference.chat(MESSAGES, max_new_tokens=20, temperature=0)
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode_chat(MESSAGES))


def test_chat_content_parts_are_joined(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "hello world"}]
    a = client.chat.completions.create(model="m", messages=parts, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model="m", messages=joined, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_equals_whole_answers(client):
    whole = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_is_server_sent_events_ending_with_done(server):
    r = sf.open_stream(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                                   "stream": True}, AUTH)
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [line for line in r.read().decode().split("\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_token_id_prompt_equals_text_prompt(client, reference):
    ids = reference.tokenizer.encode(PROMPT)
    a = client.completions.create(model="m", prompt=ids, max_tokens=10, temperature=0)
    b = client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_answer_before_it(client, stream):
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip())
    kwargs = dict(model="m", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "never seen"],
                  extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kwargs)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[:full.find(stop)]
    assert reason == "stop"


def test_seed_reproduces_a_sampled_answer(client, reference):
    def ask(seed):
        return client.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    first = ask(123)
    assert ask(123) == first
    assert ask(124) != first
    # while other requests run beside it, too
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(123))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results.values()) == {first}


def test_a_repeated_prompt_reuses_the_kept_prefix(server, client):
    before = sf.metric(server, "moeedge_reused_prompt_tokens_total", AUTH)
    prompt = "hello world, how are you today? fine thanks."
    first = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    # the second found all but the last prompt token (whose logits it needs) in the slot
    assert sf.metric(server, "moeedge_reused_prompt_tokens_total", AUTH) - before >= first.usage.prompt_tokens - 1


def test_wrong_or_missing_key_is_401(server):
    for headers in ({"authorization": "Bearer nope"}, {}):
        status, _, body = sf.request(server, "GET", "/v1/models", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt=PROMPT, max_tokens=2)
    assert sf.get(server, "/health")[0] == 200   # the health check needs no key


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": PROMPT, "max_tokens": "10"}, "max_tokens", "integer"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature", "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p", "top_p"),
    ({"prompt": PROMPT, "n": 2}, "n", "1"),
    ({"prompt": PROMPT, "stop": [""]}, "stop", "stop"),
    ({"prompt": PROMPT, "seed": 1 << 70}, "seed", "less than"),
    ({"prompt": [1, 2, 100000]}, "prompt", "vocabulary"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"max_tokens": 3}, "prompt", "Field required"),
])
def test_bad_fields_are_400(server, body, param, words):
    status, _, out = sf.request(server, "POST", "/v1/completions", body, AUTH)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param
    assert words in out["error"]["message"]


def test_bad_messages_are_400(client, server):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages.0.content"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": 3}], max_tokens=2)
    raw = b'{"messages": [{"role": "user", "content": "a\\ud800"}]}'   # a lone surrogate, as JSON may carry it
    status, _, out = sf.request(server, "POST", "/v1/chat/completions", headers=AUTH, raw=raw)
    assert status == 400 and "surrogate" in out["error"]["message"] and out["error"]["param"] == "messages"


@pytest.mark.parametrize("raw", [b'{"prompt": "x",', b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400(server, raw):
    status, _, out = sf.request(server, "POST", "/v1/completions", headers=AUTH, raw=raw)
    assert status == 400 and set(out["error"]) == {"message", "type", "param", "code"}


def test_oversized_body_is_413(server):
    status, _, out = sf.request(server, "POST", "/v1/completions", {"prompt": "x" * (100 << 10)}, AUTH)
    assert status == 413 and "limit" in out["error"]["message"]


def test_prompt_over_the_context_is_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match=f"context is {sf.CONTEXT} tokens") as e:
        client.completions.create(model="m", prompt=[5] * sf.CONTEXT, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens 2000"):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2000)


def test_unknown_path_is_404_in_openai_shape(server):
    status, _, out = sf.request(server, "GET", "/v1/nothing", headers=AUTH)
    assert status == 404 and out["error"]["type"] == "not_found_error"


def test_metrics_are_prometheus_text(server):
    status, text = sf.get(server, "/metrics", AUTH)
    assert status == 200
    for name in ("moeedge_queue_length", "moeedge_active_sequences", "moeedge_decode_tokens_per_second",
                 "moeedge_cache_hit_rate", "moeedge_bytes_read_total", 'moeedge_resident_bytes{kind="dense"}',
                 'moeedge_resident_bytes{kind="expert_cache"}', "moeedge_memory_budget_bytes",
                 "moeedge_time_to_first_token_seconds_count"):
        assert f"\n{name} " in text, name
    assert sf.metric(server, "moeedge_generated_tokens_total", AUTH) > 0


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(servers):
    narrow = servers[1]
    long = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
    running = sf.open_stream(narrow, "/v1/completions", long)
    assert running.readline().startswith(b"data: ")           # it holds the one slot
    conn = http.client.HTTPConnection("127.0.0.1", narrow.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**long, "max_tokens": 3}),
                 {"content-type": "application/json"})        # it waits: the queue's one place
    sf.wait_for(lambda: sf.metric(narrow, "moeedge_queue_length") == 1, "the second request to queue")
    status, headers, out = sf.request(narrow, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 429 and headers["Retry-After"] == "1" and out["error"]["type"] == "rate_limit_error"

    running.close()   # the client goes away mid-stream: its slot goes to the waiting request
    waited = conn.getresponse()
    assert waited.status == 200 and waited.read().decode().strip().endswith("data: [DONE]")
    assert sf.metric(narrow, 'moeedge_requests_total{outcome="cancelled"}') == 1
    assert sf.metric(narrow, "moeedge_generated_tokens_total") < long["max_tokens"]


def _browser() -> str | None:
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_chat_page_streams_a_reply_in_headless_chromium(server, client, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page test drives a browser with playwright")
    browser_path = _browser()
    expected = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello world"}],
                                              max_tokens=12, temperature=0).choices[0].message.content
    with sync_api.sync_playwright() as p:
        try:   # Debian's chromium, else playwright's own if `playwright install chromium` fetched it
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        except sync_api.Error as e:
            pytest.skip(f"no browser to drive (Debian: apt-get install chromium): {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(server.url + "/")
            page.click("#settings summary")
            page.fill("#api-key", KEY)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#prompt", "hello world")
            page.press("#prompt", "Enter")
            page.wait_for_function("document.querySelector('.msg.assistant .who')?.textContent.includes('tok/s')",
                                   timeout=60_000)
            page.wait_for_function("document.getElementById('stats').textContent.includes('cache hit rate')")
            assert page.text_content(".msg.assistant .text") == expected
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_files_are_served(server):
    for path in ("/static/app.js", "/static/style.css"):
        status, _, body = sf.request(server, "GET", path)
        assert status == 200 and len(body) > 100
