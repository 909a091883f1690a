"""What a fuzz child runs on its input: the public API as a user calls it, or the CLI.

* "load": moeedge.load(path, memory_budget=..., max_context=64) and model.logits on a
  few tokens; on success, the same logits from the reference (moeedge.fuzz.reference).
* "chat": load, then Tokenizer.render_chat, model.chat and model.generate: the chat
  template and the tokenizer files at work.
* "cli": moeedge.cli.main(argv) in-process (`info PATH`, `run PATH --prompt ...`).

Every target also checks that the input did not reach outside the checkpoint: a chat
template that ran a command (ESCAPE_MARKER written in the working directory) or read
the environment (the canary), or a shard index that made moeedge read a file outside
the checkpoint directory.
"""
from __future__ import annotations

import contextlib
import io
import os
import traceback
from dataclasses import dataclass

from moeedge.fuzz.outcomes import (CLEAN_ERROR, ESCAPE, SUCCESS, TRACEBACK, WRONG_OUTPUT, classify_cli,
                                   classify_exception)

PROBE_IDS = [1, 5, 9, 3, 7, 2]
DECODER_IDS = [0, 4, 6]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, how are you?"}]
ESCAPE_MARKER = "fuzz-escape-marker"
CANARY_ENV = "MOEEDGE_FUZZ_CANARY"
MAX_CONTEXT = 64


@dataclass
class Settings:
    budget_bytes: int       # the model's memory_budget beyond what the child holds at fork
    reference: bool = True  # compare logits with the reference


def exception_result(exc: BaseException) -> dict:
    outcome, why = classify_exception(exc)
    return {"outcome": outcome, "detail": why, **exception_info(exc)}


def exception_info(exc: BaseException) -> dict:
    """The exception's type, first line of its message, and where it was raised: the
    innermost frame in moeedge (what a fix changes) and the innermost frame of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/moeedge/" in f.filename and "/moeedge/fuzz/" not in f.filename]

    def where(frame) -> str:
        name = frame.filename.split("/moeedge/", 1)[-1] if "/moeedge/" in frame.filename else frame.filename
        return f"{name}:{frame.lineno} in {frame.name}"

    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {"exception": type(exc).__name__, "message": message[:300],
            "where": where(ours[-1]) if ours else "", "raised_at": where(frames[-1]) if frames else ""}


def _outside(checkpoint_dir: str, files: list[str]) -> list[str]:
    """Files named outside the checkpoint directory (lexically: a hub cache's symlinked blobs are fine)."""
    root = os.path.abspath(checkpoint_dir)
    return [f for f in files if os.path.commonpath([root, os.path.normpath(os.path.abspath(f))]) != root]


# What a rendered template shows only if it reached Python's objects: the repr of a
# class, module or function, or the output of `id`.
PYTHON_OBJECTS = ("<class '", "<module '", "<function ", "<built-in ", "<bound method ", "uid=")


def escaped(texts: list[str], rendered: str = "") -> str | None:
    if os.path.exists(ESCAPE_MARKER):
        return f"the input ran a command ({ESCAPE_MARKER} was written)"
    canary = os.environ.get(CANARY_ENV, "")
    if canary and any(canary in t for t in texts + [rendered] if isinstance(t, str)):
        return f"the input read the process environment ({CANARY_ENV} in its output)"
    shown = next((s for s in PYTHON_OBJECTS if s in rendered), None)
    if shown:
        return f"the chat template reached Python objects (its output shows {shown!r})"
    return None


def _budget(settings: Settings) -> int:
    from moeedge.runtime.measure import rss_bytes

    return rss_bytes() + settings.budget_bytes


def load_target(path: str, settings: Settings):
    def run(report) -> dict:
        import moeedge

        try:
            with moeedge.load(path, memory_budget=_budget(settings), max_context=MAX_CONTEXT, threads=1) as model:
                vocab = max(1, int(model.config.vocab))
                ids = [i % vocab for i in PROBE_IDS]
                decoder_ids = [i % vocab for i in DECODER_IDS] if model.encoder_decoder else None
                logits = model.logits(ids, decoder_ids)
                files = list(model.checkpoint.files)
        except BaseException as e:  # noqa: BLE001 -- every exception is an outcome
            return exception_result(e)
        if os.path.isdir(path) and _outside(path, files):
            outside = os.path.relpath(_outside(path, files)[0], path)
            return {"outcome": ESCAPE, "detail": f"read {outside}, outside the checkpoint directory"}
        result = {"outcome": SUCCESS, "detail": "loaded; logits of shape " + str(list(logits.shape))}
        if not settings.reference:
            return result
        report({"stage": "moeedge", **result})
        from moeedge.fuzz import reference

        expected = (reference.hf_logits(path, ids, decoder_ids) if os.path.isdir(path)
                    else reference.gguf_logits(path, ids))
        if expected is None:
            return {**result, "detail": result["detail"] + "; the reference refused the input (not compared)"}
        wrong = reference.difference(logits, expected)
        if wrong:
            return {"outcome": WRONG_OUTPUT, "detail": wrong}
        return {**result, "detail": result["detail"] + "; equal to the reference's"}

    return run


def chat_target(path: str, settings: Settings):
    def run(report) -> dict:
        import moeedge

        texts: list[str] = []
        try:
            with moeedge.load(path, memory_budget=_budget(settings), max_context=MAX_CONTEXT, threads=1) as model:
                if model.tokenizer is None:
                    return {"outcome": SUCCESS, "detail": "no tokenizer files: nothing to render"}
                texts.append(model.tokenizer.render_chat(MESSAGES))
                texts.append(model.chat(MESSAGES, max_new_tokens=2, temperature=0))
                texts.append(model.generate("hello world", max_new_tokens=2, temperature=0))
        except BaseException as e:  # noqa: BLE001
            why = escaped(texts[1:] + [str(e)[:10000]], texts[0] if texts else "")
            return {"outcome": ESCAPE, "detail": why} if why else exception_result(e)
        why = escaped(texts[1:], texts[0])
        if why:
            return {"outcome": ESCAPE, "detail": why}
        return {"outcome": SUCCESS, "detail": f"rendered {len(texts[0])} characters, replied"}

    return run


def cli_argv(target: str, path: str, settings: Settings) -> list[str]:
    if target == "cli-info":
        return ["info", path]
    return ["run", path, "--prompt", "hello world", "--max-new-tokens", "2", "--max-context", str(MAX_CONTEXT),
            "--threads", "1", "--memory-budget", str(_budget(settings))]


def cli_target(target: str, path: str, settings: Settings):
    def run(report) -> dict:
        from moeedge import cli

        argv = cli_argv(target, path, settings)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = cli.main(argv)
                except SystemExit as e:  # argparse: bad flags
                    status = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 -- out of main: the user would see a traceback
            info = exception_info(e)
            return {"outcome": TRACEBACK, "detail": f"{type(e).__name__} out of moeedge.cli.main", **info}
        why = escaped([out.getvalue(), err.getvalue()])
        if why:
            return {"outcome": ESCAPE, "detail": why}
        outcome, why = classify_cli(status or 0, err.getvalue())
        result = {"outcome": outcome, "detail": why}
        if outcome in (CLEAN_ERROR, TRACEBACK):
            last = [line for line in err.getvalue().splitlines() if line.strip()]
            result["message"] = (last[-1] if last else "")[:300]
        return result

    return run


def make_target(target: str, path: str, settings: Settings):
    if target == "load":
        return load_target(path, settings)
    if target == "chat":
        return chat_target(path, settings)
    if target in ("cli-info", "cli-run"):
        return cli_target(target, path, settings)
    raise ValueError(f"unknown target {target!r}")
