"""The engine: one thread owns the model and decodes every admitted request together.

Each loop turn runs at most one prefill chunk (of the oldest request still reading its
prompt) and then one decode step of every request that has a token to feed: running
streams keep flowing while a long prompt is read, and a decode step reads each expert the
sequences route to once and multiplies it once for all of them (runner.step).

A prefill chunk is a step of its own, not one more entry of the decode step: the
decoder's step is batch-invariant (a sequence's logits have the bits it gets alone) only
when every entry is one token, and greedy output must not depend on what else runs.

KV: max_batch slots of max_context tokens each (llama-server's -np). A request takes a
free slot, the one whose kept tokens share the longest prefix with its prompt, so a chat's
next turn or a shared system prompt is not read again; a finished request leaves its
tokens in the slot for that. A request is admitted when a slot is free (its prompt plus
max_tokens fits a slot's context, checked before it is queued); up to max_queue wait
for one, and beyond that submit() raises QueueFull.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from moeedge.models.runner import Sequence, common_prefix
from moeedge.runtime.plan import prefill_borrow
from moeedge.runtime.sampling import Sampler, SamplingParams
from moeedge.serve.textstream import TextStream


class QueueFull(RuntimeError):
    """Every slot is busy and max_queue requests already wait: 429."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no more requests: 503."""


@dataclass
class Event:
    """What the engine tells a request's handler: a piece of text, and at the end why it
    stopped ("stop", "length", "cancelled") or an error."""
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Job:
    """One request inside the engine. emit() is called from the engine thread."""
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    emit: Callable[[Event], None]
    ignore_eos: bool = False
    cancelled: bool = False
    # the engine's
    seq: Sequence | None = None
    done: int = 0                       # prompt tokens in the slot's KV
    history: list[int] = field(default_factory=list)
    generated: int = 0
    next_token: int | None = None       # sampled, to be fed to the next decode step
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    sampler: Sampler = field(init=False)
    text: TextStream = field(init=False)

    def cancel(self) -> None:
        """The client went away: the engine frees the slot at its next step (any thread)."""
        self.cancelled = True


@dataclass
class Counters:
    prompt_tokens: int = 0              # run through the model (a reused prefix is not)
    reused_tokens: int = 0              # prompt tokens found in a slot already
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    requests: dict = field(default_factory=dict)   # finish reason (or "error", "rejected") -> count


class Engine:
    def __init__(self, model, max_batch: int, max_queue: int, observe: Callable[[str, float], None] | None = None):
        if max_batch > model.plan.n_sequences:
            raise ValueError(f"max_batch {max_batch} is more than the {model.plan.n_sequences} KV slots the "
                             f"model was loaded with")
        self.model = model
        self.runner = model.runner
        self.eos = model.eos_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observe = observe or (lambda name, seconds: None)   # ("ttft" | "itl", seconds)
        self.free: list[Sequence] = [model.sequence] + [self.runner.new_sequence() for _ in range(max_batch - 1)]
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.counters = Counters()
        self._recent: deque[tuple[float, int]] = deque()   # (time, tokens) of recent decode steps
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="moeedge-engine", daemon=True)
        self._thread.start()

    # -- what other threads call ---------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) - len(self.free) >= self.max_queue:
                self._count("rejected")
                raise QueueFull(f"all {self.max_batch} slots are busy and {self.max_queue} requests are waiting")
            job.sampler = Sampler(job.params)
            job.text = TextStream(self.model.tokenizer, job.stop)
            self.waiting.append(job)
            self._cond.notify()

    def snapshot(self) -> dict:
        """The figures /metrics and /stats show (read without stopping the engine)."""
        c = self.counters
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t < 10.0]
        span = now - recent[0][0] if recent else 0.0
        return {"queue_length": max(0, len(self.waiting) - len(self.free)), "active_sequences": len(self.running),
                "max_batch": self.max_batch, "max_queue": self.max_queue,
                "prompt_tokens": c.prompt_tokens, "reused_tokens": c.reused_tokens,
                "generated_tokens": c.generated_tokens, "decode_steps": c.decode_steps,
                "decode_seconds": c.decode_seconds, "prefill_seconds": c.prefill_seconds,
                "decode_tok_s": c.generated_tokens / c.decode_seconds if c.decode_seconds else 0.0,
                "recent_tok_s": sum(n for _, n in recent) / max(span, 1.0) if recent else 0.0,
                "requests": dict(c.requests)}

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what waits and what runs (each handler gets its last event), stop the thread."""
        with self._cond:
            self._stopping = True
            for job in self.running + list(self.waiting):
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.counters.requests[what] = self.counters.requests.get(what, 0) + 1

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._stopping):
                    self._cond.wait()
                self._admit()
                if self._stopping and not self.running and not self.waiting:
                    return
            self._drop_cancelled()
            try:
                with torch.inference_mode():
                    self._prefill_chunk()
                    self._decode()
            except Exception as e:  # a bug of the engine's own: the requests end with it, the server goes on
                for job in list(self.running):
                    self._finish(job, None, f"{type(e).__name__}: {e}")

    def _admit(self) -> None:
        for job in [j for j in self.waiting if j.cancelled]:   # their clients left: places in the queue free
            self.waiting.remove(job)
            self._finish(job, "cancelled")
        while self.waiting and self.free:
            job = self.waiting.popleft()
            # the free slot whose kept tokens share the longest prefix with this prompt
            shared = [common_prefix(seq.ids, job.ids) for seq in self.free]
            best = max(range(len(self.free)), key=shared.__getitem__)
            job.seq = self.free.pop(best)
            self.runner.truncate(job.seq, shared[best])
            job.done = shared[best]
            job.history = list(job.ids)
            self.counters.reused_tokens += shared[best]
            self.running.append(job)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.running if j.cancelled]:
            self._finish(job, "cancelled")

    def _finish(self, job: Job, reason: str | None, error: str | None = None) -> None:
        if job in self.running:
            self.running.remove(job)
        if job.seq is not None:
            self.free.append(job.seq)   # its tokens stay, for the next prompt sharing them
            job.seq = None
        self._count(error and "error" or reason)
        job.emit(Event(finish_reason=reason, error=error, prompt_tokens=len(job.ids),
                       completion_tokens=job.generated))

    def _prefill_chunk(self) -> None:
        job = next((j for j in self.running if j.done < len(j.ids)), None)
        if job is None:
            return
        chunk = job.ids[job.done:job.done + self.model.plan.prefill_chunk]
        start = time.perf_counter()
        try:
            with prefill_borrow(self.model.cache, self.model.plan), self.runner.reading_prompt():
                logits = self.runner.step([(job.seq, torch.tensor(chunk))])[0][-1]
        except Exception as e:  # an expert read that failed, NaN logits: this request ends, the server goes on
            self._finish(job, None, f"{type(e).__name__}: {e}")
            return
        self.counters.prefill_seconds += time.perf_counter() - start
        self.counters.prompt_tokens += len(chunk)
        job.done += len(chunk)
        if job.done == len(job.ids):
            self._take(job, job.sampler.choose(logits, job.history))

    def _decode(self) -> None:
        jobs = [j for j in self.running if j.next_token is not None]
        if not jobs:
            return
        start = time.perf_counter()
        try:
            out = self.runner.step([(j.seq, torch.tensor([j.next_token])) for j in jobs])
        except Exception as e:
            for job in jobs:
                self._finish(job, None, f"{type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        self.counters.decode_seconds += now - start
        self.counters.decode_steps += 1
        self.counters.generated_tokens += len(jobs)
        self._recent.append((now, len(jobs)))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        for job, logits in zip(jobs, out):
            self._take(job, job.sampler.choose(logits[-1], job.history))

    def _take(self, job: Job, token: int) -> None:
        """A sampled token: the end, or text for the client and the next step's input."""
        now = time.perf_counter()
        self.observe("ttft" if job.last_token_at is None else "itl", now - (job.last_token_at or job.submitted))
        job.last_token_at = now
        job.next_token = None
        if token in self.eos and not job.ignore_eos:
            self._emit_end(job, "stop")
            return
        job.generated += 1
        job.history.append(token)
        piece = job.text.push(token)
        if piece:
            job.emit(Event(text=piece))
        if job.text.stopped:
            self._emit_end(job, "stop")
        elif job.generated >= job.max_tokens:
            self._emit_end(job, "length")
        else:
            job.next_token = token

    def _emit_end(self, job: Job, reason: str) -> None:
        rest = job.text.flush()
        if rest:
            job.emit(Event(text=rest))
        self._finish(job, reason)
