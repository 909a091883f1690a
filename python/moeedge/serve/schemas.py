"""What a client may send to /v1/completions and /v1/chat/completions, validated (every
field is untrusted), and how it becomes a generation: token ids and SamplingParams.

Fields OpenAI defines but moeedge does not do (n > 1, logprobs, tools, penalties other
than repeat_penalty) are refused with a message naming them rather than silently
ignored; fields it does not know are ignored, as OpenAI-compatible servers do.
Sampling fields a request leaves out take SamplingParams' defaults.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moeedge.runtime.sampling import SamplingParams

MAX_STOP = 16            # OpenAI takes 4; llama-server any number
MAX_STOP_CHARS = 1024
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)   # what torch.Generator.manual_seed takes


class RequestError(ValueError):
    """A request that cannot be served as sent: 400 in OpenAI's error shape, naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class _Strict(BaseModel):
    # strict: "3" is not an integer and true is not 1, as in OpenAI's API
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """The fields both endpoints share."""
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False      # llama-server's and vLLM's: run to max_tokens (load generators)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] | None = None     # not done: repeat_penalty instead
    frequency_penalty: Literal[0, 0.0] | None = None
    user: str | None = None

    @field_validator("temperature", "top_p", "min_p", "repeat_penalty")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters")
        return stops


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    tools: None = None
    tool_choice: Literal["none"] | None = None
    response_format: Union[dict, None] = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v != {"type": "text"}:
            raise ValueError("only {'type': 'text'} is supported")
        return v

    def plain_messages(self) -> list[dict]:
        """Messages with content parts joined into one string (the chat template's input)."""
        return [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in
                                                                                           m.content),
                 **({"name": m.name} if m.name is not None else {})} for m in self.messages]


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    p = req.prompt
    if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
        return p
    if not p:
        raise RequestError("prompt is empty", "prompt")
    if len(p) != 1:
        raise RequestError(f"prompt holds {len(p)} prompts; send one per request (n=1)", "prompt")
    return p[0]


def sampling_params(req: Sampling, defaults: dict | None = None) -> SamplingParams:
    """The request's sampling, its absent fields the model's defaults (else SamplingParams');
    bad values 400."""
    given = {f.name: getattr(req, f.name) for f in fields(SamplingParams) if getattr(req, f.name) is not None}
    try:
        return SamplingParams(**{**(defaults or {}), **given})
    except ValueError as e:
        raise RequestError(str(e), str(e).split()[0]) from None


def max_tokens(req: Sampling, n_prompt: int, max_context: int, default: int | None) -> int:
    """The tokens a request may generate: asked, or default (None: the rest of the context).
    A prompt that leaves no room, or a request over the context, is a 400 naming the limit."""
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if n_prompt + (asked or 1) > max_context:
        wanted = f"{n_prompt} prompt tokens" + (f" + max_tokens {asked}" if asked else " + 1 generated")
        raise RequestError(f"this model's context is {max_context} tokens, but {wanted} is "
                           f"{n_prompt + (asked or 1)}: shorten the prompt or lower max_tokens", "messages"
                           if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
    room = max_context - n_prompt
    return asked or min(room, default or room)


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise RequestError("prompt is empty: no tokens to run", "prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
