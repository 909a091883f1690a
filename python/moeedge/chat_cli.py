"""`moeedge chat`: an interactive, streaming conversation. It opens with a line naming
the model, its size, the memory budget and the plan, and the sampling it uses; each
answer ends with a one-line status. Ctrl-C stops the current answer, not the program."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moeedge.api import ContextOverflowError, MoeModel
from moeedge.chat_input import line_reader, read_message
from moeedge.chat_template import check_messages
from moeedge.default_model import BUNDLED
from moeedge.keys import ExpertKey
from moeedge.tokenizer import check_prompt
from moeedge.units import format_bytes

HELP = ("commands: /reset  /stats  /save FILE  /load FILE  /quit  (Ctrl-C stops an answer, Ctrl-D quits; "
        'end a line with \\ or wrap text in """ to write several lines)')
ABOUT_DEFAULT = ("the bundled default model: a small model trained on Python's standard library; it writes "
                 "Python-like text, not answers")


@dataclass
class ChatSettings:
    max_new_tokens: int = 128
    sampling: dict = field(default_factory=dict)  # model.chat's keyword arguments (None: the model's default)
    system: str | None = None


def model_name(source) -> str:
    """A checkpoint's name as a user knows it: org/name for a Hugging Face cache snapshot
    (.../models--org--name/snapshots/REV), else the file or directory name."""
    path = Path(str(source))
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return path.name or str(path)


def banner(model: MoeModel) -> str:
    """The first line: which model, how big, the budget and how the plan splits it."""
    ckpt, plan = model.checkpoint, model.plan
    params = ckpt.dense_numel + sum(math.prod(p.shape) for key in ckpt.expert_ranges
                                    for p in ckpt.parts_of(*ExpertKey.unpack(key)))
    size = ckpt.expert_nbytes + plan.dense_bytes
    share = min(1.0, plan.expert_cache_bytes / ckpt.expert_nbytes) if ckpt.expert_nbytes else 1.0
    line = (f"{model_name(ckpt.source)}: {_count(params)} parameters ({format_bytes(size)}), "
            f"{ckpt.config.n_experts} experts top-{ckpt.config.top_k} | budget {format_bytes(plan.budget_bytes)}: "
            f"dense {format_bytes(plan.dense_bytes)}, KV cache {format_bytes(plan.kv_cache_bytes)}, "
            f"expert cache {format_bytes(plan.expert_cache_bytes)} (holds {share:.0%} of the experts)")
    if Path(str(ckpt.source)).resolve() == BUNDLED.resolve():
        line = f"moeedge default model{line[line.index(':'):]} | {ABOUT_DEFAULT}"
    return line


def sampling_line(model: MoeModel, sampling: dict) -> str:
    """What answers are sampled with, and where that came from."""
    given = {k: v for k, v in sampling.items() if v is not None and k != "stop"}
    p = model.sampling_params(**given)
    how = ("greedy" if p.greedy else
           f"temperature {p.temperature:g}, top-k {p.top_k}, top-p {p.top_p:g}, min-p {p.min_p:g}")
    if p.repeat_penalty != 1.0:
        how += f", repeat penalty {p.repeat_penalty:g} over {p.repeat_last_n} tokens"
    origin = f"defaults from {model.sampling_from}" if model.sampling_from else "llama.cpp's defaults"
    overridden = ", ".join(k.replace("_", "-") for k in given if k != "seed")
    return f"sampling: {how} ({origin}{'; set here: ' + overridden if overridden else ''})"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def status_line(model: MoeModel, before: dict) -> str:
    s = model.stats()
    gets = s["hits"] + s["misses"] - before["hits"] - before["misses"]
    hits = s["hits"] - before["hits"]
    tokens = s["generated_tokens"] - before["generated_tokens"]
    seconds = s["decode_seconds"] - before["decode_seconds"]
    rate = tokens / seconds if seconds else 0.0
    hit_rate = f"{hits / gets:.0%}" if gets else "n/a"
    return f"[{rate:.1f} tok/s, cache hit rate {hit_rate}, resident {format_bytes(s['resident']['process_bytes'])}]"


def fit_context(model: MoeModel, messages: list[dict], reserve: int) -> list[dict]:
    """Drop the oldest turns (never a system message) until the conversation fits."""
    while True:
        n = len(model.tokenizer.encode_chat(messages))
        if n + reserve <= model.runner.max_context:
            return messages
        droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if not droppable:
            raise ContextOverflowError(f"the message alone is {n} tokens; max_context is {model.runner.max_context}")
        print(f"(conversation trimmed: the oldest turn no longer fits in max_context={model.runner.max_context})",
              file=sys.stderr)
        del messages[droppable[0]]


def run_chat(model: MoeModel, settings: ChatSettings, read=None, write=None) -> int:
    """The session; read: input()'s contract (default: line editing on a terminal)."""
    write = write or sys.stdout
    if model.tokenizer is None:
        raise ValueError(f"{model.checkpoint.source} has no tokenizer: chat needs one")
    start = [{"role": "system", "content": settings.system}] if settings.system else []
    # A chat template that cannot render a one-line conversation would fail at every turn:
    # its error ends the command now (one line, exit status 2), before the first prompt.
    model.tokenizer.render_chat([*start, {"role": "user", "content": "hello"}])
    read = read or line_reader()
    messages: list[dict] = list(start)
    print(banner(model), file=write)
    print(sampling_line(model, settings.sampling), file=write)
    print(HELP, file=write)
    while True:
        try:
            text = read_message(read).strip()
        except EOFError:
            print(file=write)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)", file=write)
            continue
        if not text:
            continue
        if text.startswith("/"):
            messages = _command(model, text, messages, start, write)
            if messages is None:
                return 0
            continue
        try:
            check_prompt(text, "that line")  # invalid UTF-8 on stdin arrives as lone surrogates
        except ValueError as e:
            print(f"({e}; not sent)", file=write)
            continue
        messages.append({"role": "user", "content": text})
        try:
            messages = fit_context(model, messages, settings.max_new_tokens)
        except ValueError as e:  # too long for max_context, or the chat template refused this conversation
            print(f"({e})", file=write)
            messages.pop()
            continue
        _answer(model, messages, settings, write)


def _command(model: MoeModel, text: str, messages: list[dict], start: list[dict], write) -> list[dict] | None:
    """Run a /command; the conversation after it, or None to quit."""
    command, _, arg = text.partition(" ")
    if command == "/quit":
        return None
    if command == "/reset":
        print("(conversation cleared)", file=write)
        return list(start)  # the --system message stays
    if command == "/stats":
        print(json.dumps(model.stats(), indent=2, default=str), file=write)
    elif command == "/save" and arg:
        try:
            with open(arg, "w") as f:
                json.dump({"messages": messages}, f, indent=2)
            print(f"(saved {len(messages)} messages to {arg})", file=write)
        except OSError as e:
            print(f"(cannot save to {arg}: {e.strerror})", file=write)
    elif command == "/load" and arg:
        try:
            with open(arg) as f:
                loaded = json.load(f)["messages"]
            if not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in loaded):
                raise ValueError("each message needs a role and a content")
            if loaded:
                check_messages(loaded)  # roles and contents are strings, and valid text
            print(f"(loaded {len(loaded)} messages from {arg})", file=write)
            return loaded
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"(cannot load {arg}: {e})", file=write)
    else:
        print(HELP, file=write)
    return messages


def _answer(model: MoeModel, messages: list[dict], settings: ChatSettings, write) -> None:
    """Stream the model's answer (Ctrl-C stops it), append it, then the status line."""
    before = model.stats()
    answer = []
    try:
        for piece in model.chat(messages, stream=True, max_new_tokens=settings.max_new_tokens, **settings.sampling):
            answer.append(piece)
            print(piece, end="", flush=True, file=write)
    except KeyboardInterrupt:
        print(" (stopped)", end="", file=write)
    print(file=write)
    messages.append({"role": "assistant", "content": "".join(answer)})
    print(status_line(model, before), file=write)
