"""`moeedge chat`: an interactive, streaming conversation with a one-line status after
each answer. Ctrl-C stops the current answer, not the program."""
from __future__ import annotations

import json
import sys

from moeedge.api import ContextOverflowError, MoeModel
from moeedge.chat_template import check_messages
from moeedge.tokenizer import check_prompt
from moeedge.units import format_bytes

HELP = "commands: /reset  /stats  /save FILE  /load FILE  /quit  (Ctrl-C stops an answer, Ctrl-D quits)"


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


def run_chat(model: MoeModel, max_new_tokens: int, temperature: float, seed: int | None,
             read=input, write=sys.stdout) -> int:
    if model.tokenizer is None:
        raise ValueError(f"{model.checkpoint.source} has no tokenizer: chat needs one")
    # A chat template that cannot render a one-line conversation would fail at every turn:
    # its error ends the command now (one line, exit status 2), before the first prompt.
    model.tokenizer.render_chat([{"role": "user", "content": "hello"}])
    messages: list[dict] = []
    print(HELP, file=write)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print(file=write)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)", file=write)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            messages = _command(model, text, messages, write)
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
            messages = fit_context(model, messages, max_new_tokens)
        except ValueError as e:  # too long for max_context, or the chat template refused this conversation
            print(f"({e})", file=write)
            messages.pop()
            continue
        _answer(model, messages, max_new_tokens, temperature, seed, write)


def _command(model: MoeModel, text: str, messages: list[dict], write) -> list[dict] | None:
    """Run a /command; the conversation after it, or None to quit."""
    command, _, arg = text.partition(" ")
    if command == "/quit":
        return None
    if command == "/reset":
        print("(conversation cleared)", file=write)
        return []
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


def _answer(model: MoeModel, messages: list[dict], max_new_tokens: int, temperature: float, seed: int | None,
            write) -> None:
    """Stream the model's answer (Ctrl-C stops it), append it, then the status line."""
    before = model.stats()
    answer = []
    try:
        for piece in model.chat(messages, stream=True, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed):
            answer.append(piece)
            print(piece, end="", flush=True, file=write)
    except KeyboardInterrupt:
        print(" (stopped)", end="", file=write)
    print(file=write)
    messages.append({"role": "assistant", "content": "".join(answer)})
    print(status_line(model, before), file=write)
