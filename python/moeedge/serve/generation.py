"""/v1/completions and /v1/chat/completions: a validated request becomes an engine Job,
whose events come back as OpenAI's response, or as its chunks over server-sent events
ending with [DONE]."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from moeedge.serve.engine import Engine, Event, Job
from moeedge.serve.schemas import (ChatRequest, CompletionRequest, RequestError, Sampling, check_token_ids,
                                   completion_prompt, max_tokens, sampling_params)

DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's for /v1/completions; chat's is the rest of the context


@dataclass
class Served:
    """What the endpoints need from the server."""
    engine: Engine
    tokenizer: object
    model_id: str
    max_context: int
    shutdown_grace: float = 10.0
    sampling: dict = field(default_factory=dict)  # the model's defaults (MoeModel.sampling_defaults)


class Channel:
    """Events from the engine thread into the request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:  # the engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


async def _encode(served: Served, req: Sampling, kind: str) -> list[int]:
    tok = served.tokenizer
    vocab = tok.vocab_size
    if kind == "chat":
        try:
            ids = await run_in_threadpool(tok.encode_chat, req.plain_messages())
        except ValueError as e:  # a message the template or the tokenizer refuses
            raise RequestError(str(e), "messages") from None
    else:
        prompt = completion_prompt(req)
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty", "prompt")
            try:
                ids = await run_in_threadpool(tok.encode, prompt)
            except ValueError as e:
                raise RequestError(str(e), "prompt") from None
        else:
            ids = list(prompt)
    check_token_ids(ids, max(vocab, 1))
    return ids


async def generate(served: Served, req: Sampling, request: Request, kind: str):
    ids = await _encode(served, req, kind)
    default = DEFAULT_COMPLETION_TOKENS if kind == "text" else None
    limit = max_tokens(req, len(ids), served.max_context, default)
    params = sampling_params(req, served.sampling)
    channel = Channel()
    job = Job(ids, params, limit, req.stop or [], channel.emit, req.ignore_eos)
    served.engine.submit(job)   # QueueFull, ShuttingDown: the app's handlers answer them
    shape = _Shape(kind, served.model_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(_stream(job, channel, shape, include_usage), sep="\n", ping=0,
                                   shutdown_event=anyio.Event(), shutdown_grace_period=served.shutdown_grace)
    return await _whole(job, channel, shape, request)


async def _whole(job: Job, channel: Channel, shape: "_Shape", request: Request) -> JSONResponse:
    text: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(channel.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            text.append(event.text)
            if event.error:
                return error_response(500, f"generation failed: {event.error}", "server_error")
            if event.finish_reason == "cancelled":  # by the server's shutdown
                return error_response(503, "the server is shutting down: the request was cancelled",
                                      "server_error")
            if event.finish_reason:
                return JSONResponse(shape.whole("".join(text), event))
    finally:
        job.cancel()   # ended or not, the slot is not needed any more (a no-op once finished)


async def _stream(job: Job, channel: Channel, shape: "_Shape", include_usage: bool):
    try:
        if shape.kind == "chat":
            yield {"data": json.dumps(shape.chunk(None, first=True))}
        while True:
            event = await channel.queue.get()
            if event.error:
                yield {"data": json.dumps(error_body(f"generation failed: {event.error}", "server_error"))}
                return
            if event.text:
                yield {"data": json.dumps(shape.chunk(event.text))}
            if event.finish_reason:
                yield {"data": json.dumps(shape.chunk(None, finish=event.finish_reason))}
                if include_usage:
                    yield {"data": json.dumps(shape.usage_chunk(event))}
                yield {"data": "[DONE]"}
                return
    finally:
        job.cancel()   # the client went away, or the server stops: the engine frees the slot


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, kind: str, model_id: str):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model_id

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def whole(self, text: str, event: Event) -> dict:
        reason = event.finish_reason
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(event)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(event)}

    def chunk(self, text: str | None, first: bool = False, finish: str | None = None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, event: Event) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(event)}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


async def completions(served: Served, req: CompletionRequest, request: Request):
    return await generate(served, req, request, "text")


async def chat_completions(served: Served, req: ChatRequest, request: Request):
    return await generate(served, req, request, "chat")
