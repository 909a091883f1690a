"""The serve engine's scheduling, against a recording fake runner (no model, no server):
prefill chunks interleaved with decode steps, decoding sequences stepped together, a
cancelled request's slot given to a waiting one at the next step, the queue bound, close()."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import pytest
import torch

from moeedge.models.runner import SlotPool, SlotSequences
from moeedge.runtime.sampling import SamplingParams
from moeedge.serve.engine import Engine, Job, QueueFull

VOCAB = 50
WAIT_S = 30.0


class FakeRunner(SlotSequences):
    """Logits that make the next token (last + 1) % VOCAB; every step's [(slot, n tokens)] logged.
    A step waits for `go` (set by default)."""

    def __init__(self, n: int):
        self.slots = SlotPool(n)
        self.log: list[list[tuple[int, int]]] = []
        self.reading: list[bool] = []  # in_prompt at each step
        self.go = threading.Event()
        self.go.set()

    def step(self, batch, all_logits=False):
        assert self.go.wait(WAIT_S)
        self.log.append([(seq.slot, len(tokens)) for seq, tokens in batch])
        self.reading.append(self.in_prompt)
        out = []
        for seq, tokens in batch:
            seq.ids.extend(int(t) for t in tokens)
            out.append(torch.nn.functional.one_hot(torch.tensor([(int(tokens[-1]) + 1) % VOCAB]), VOCAB).float())
        return out


class FakeTokenizer:
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@dataclass
class FakePlan:
    n_sequences: int
    prefill_chunk: int = 4
    expert_cache_bytes: int = 0
    prefill_borrow_bytes: int = 0


class FakeCache:
    budget_bytes = 0

    def set_budget(self, n):
        pass


class FakeModel:
    def __init__(self, n: int):
        self.runner = FakeRunner(n)
        self.sequence = self.runner.new_sequence()
        self.plan = FakePlan(n)
        self.cache = FakeCache()
        self.tokenizer = FakeTokenizer()
        self.eos_ids = {VOCAB + 1}   # never sampled: requests run to max_tokens


def job(prompt: list[int], max_tokens: int) -> tuple[Job, queue.Queue]:
    events: queue.Queue = queue.Queue()
    return Job(prompt, SamplingParams(temperature=0.0), max_tokens, [], events.put), events


def last_event(events: queue.Queue):
    while True:
        event = events.get(timeout=WAIT_S)
        if event.finish_reason or event.error:
            return event


@pytest.fixture
def engines():
    made = []
    yield lambda model, *a: made.append(Engine(model, *a)) or made[-1]
    for e in made:
        e.model.runner.go.set()
        e.close()


def test_prefill_chunks_interleave_with_decode_steps_and_decoders_step_together(engines):
    model = FakeModel(2)
    model.runner.go.clear()
    engine = engines(model, 2, 4)
    a, a_events = job([1, 2], 20)
    b, b_events = job(list(range(10, 22)), 6)   # 12 tokens: 3 chunks of 4
    engine.submit(a)
    engine.submit(b)
    model.runner.go.set()
    assert last_event(b_events).finish_reason == "length"
    assert last_event(a_events).finish_reason == "length"
    log = model.runner.log
    chunks = [i for i, step in enumerate(log) if len(step) == 1 and step[0][1] == 4]   # B's prefill
    assert len(chunks) == 3
    between = log[chunks[0] + 1:chunks[-1]]
    assert any(len(step) == 1 and step[0][1] == 1 for step in between), log   # A kept decoding
    assert any(len(step) == 2 and all(n == 1 for _, n in step) for step in log), log   # both in one step
    # prefill chunks read a prompt (they may take the prompt kernels); decode steps never do
    assert [model.runner.reading[i] for i in chunks] == [True] * 3
    assert not any(r for i, r in enumerate(model.runner.reading) if len(log[i]) > 1 or log[i][0][1] == 1)


def test_greedy_tokens_follow_the_logits(engines):
    model = FakeModel(1)
    engine = engines(model, 1, 0)
    j, events = job([3, 4], 5)
    engine.submit(j)
    texts = []
    while True:
        event = events.get(timeout=WAIT_S)
        texts.append(event.text)
        if event.finish_reason:
            break
    assert "".join(texts) == FakeTokenizer().decode([5, 6, 7, 8, 9])
    assert (event.prompt_tokens, event.completion_tokens) == (2, 5)


def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(engines):
    model = FakeModel(1)
    engine = engines(model, 1, 1)
    long, long_events = job([1], 10**6)
    engine.submit(long)
    first = long_events.get(timeout=WAIT_S)
    assert first.text   # it runs
    waiting, waiting_events = job([7, 8], 3)
    engine.submit(waiting)
    long.cancel()
    end = last_event(long_events)
    assert end.finish_reason == "cancelled" and end.completion_tokens < 10**6
    assert last_event(waiting_events).finish_reason == "length"


def test_the_queue_is_bounded(engines):
    model = FakeModel(1)
    model.runner.go.clear()
    engine = engines(model, 1, 1)
    engine.submit(job([1], 5)[0])    # takes the slot (its step waits)
    engine.submit(job([2], 5)[0])    # waits
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        engine.submit(job([3], 5)[0])
    assert engine.counters.requests == {"rejected": 1}


def test_close_cancels_what_runs_and_what_waits():
    model = FakeModel(1)
    engine = Engine(model, 1, 4)
    running, running_events = job([1], 10**6)
    engine.submit(running)
    running_events.get(timeout=WAIT_S)
    waiting, waiting_events = job([2], 5)
    engine.submit(waiting)
    engine.close()
    assert last_event(running_events).finish_reason == "cancelled"
    assert last_event(waiting_events).finish_reason == "cancelled"
    assert engine.stopped


def test_a_waiting_request_whose_client_left_gives_up_its_place(engines):
    model = FakeModel(1)
    engine = engines(model, 1, 2)
    running, running_events = job([1], 10**6)
    engine.submit(running)
    running_events.get(timeout=WAIT_S)
    engine.submit(job([2], 5)[0])
    gone, gone_events = job([3], 5)
    engine.submit(gone)
    gone.cancel()   # behind another waiting request
    assert last_event(gone_events).finish_reason == "cancelled"
    engine.submit(job([4], 5)[0])   # its place is free again (without it: QueueFull)
    running.cancel()
