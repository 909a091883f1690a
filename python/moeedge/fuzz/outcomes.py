"""What one fuzz input ended in, and the rule that tells a clean error from a traceback.

The rule (what tests/test_fuzz.py holds every input to):

* API targets (moeedge.load, model.logits, model.chat, ...): an exception is a clean
  error when it is one of the documented kinds -- moeedge.formats.errors.CheckpointError
  or any other ValueError (UnicodeDecodeError and json.JSONDecodeError included),
  moeedge.BudgetError, moeedge.ExpertReadError, or a RuntimeError other than
  RecursionError and NotImplementedError -- and its message is not empty, is one line
  and is at most MAX_MESSAGE characters (a message that echoes a hostile 10 MB value is
  not "one clean error"). Every other exception is a "traceback": KeyError, TypeError,
  IndexError, AttributeError, ZeroDivisionError, OverflowError, RecursionError, a bare
  OSError, jinja2's own errors, ... A bare MemoryError (not BudgetError) is an "oom": the
  process ran out of the memory it was given.
* The CLI (moeedge.cli.main in-process): exit status 0 is success; exit status 2 with
  exactly one non-empty line on stderr, that line starting "moeedge: error: " (or
  argparse's "moeedge: error: "), at most MAX_MESSAGE characters, and no "Traceback"
  is a clean error; anything else (another status, an exception out of main, more lines)
  is a "traceback".
"""
from __future__ import annotations

SUCCESS = "success"
CLEAN_ERROR = "clean error"
CRASH = "crash"            # killed by a signal other than the OOM killer's (SIGSEGV, SIGABRT, SIGBUS, ...)
HANG = "hang"              # still running at the timeout: killed by the fork server
TRACEBACK = "traceback"    # an exception that is not one clean error
OOM = "oom"                # SIGKILL by the cgroup's OOM killer, or MemoryError under RLIMIT_AS
WRONG_OUTPUT = "wrong output"  # loaded, but its logits differ from the reference's on the same files
ESCAPE = "escape"          # a chat template reached the host: ran a command, read the canary

OUTCOMES = (SUCCESS, CLEAN_ERROR, CRASH, HANG, TRACEBACK, OOM, WRONG_OUTPUT, ESCAPE)
BAD = frozenset({CRASH, HANG, TRACEBACK, OOM, WRONG_OUTPUT, ESCAPE})

MAX_MESSAGE = 2000


def _documented_kinds() -> tuple[type, ...]:
    from moeedge._core import BudgetError, ExpertReadError  # noqa: PLC0415 (the native module, imported once)

    return (ValueError, BudgetError, ExpertReadError, RuntimeError)


def message_problem(message: str) -> str | None:
    """Why a message is not one clean line (None: it is)."""
    if not message.strip():
        return "empty message"
    if "\n" in message.strip():
        return "message of several lines"
    if len(message) > MAX_MESSAGE:
        return f"message of {len(message)} characters"
    return None


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(outcome, why) of an exception out of an API target."""
    from moeedge._core import BudgetError  # noqa: PLC0415

    name = type(exc).__name__
    if isinstance(exc, MemoryError) and not isinstance(exc, BudgetError):
        return OOM, f"{name} (out of the memory limit)"
    if isinstance(exc, (RecursionError, NotImplementedError)) or not isinstance(exc, _documented_kinds()):
        return TRACEBACK, f"{name} is not a documented error kind"
    problem = message_problem(str(exc))
    if problem:
        return TRACEBACK, f"{name} with a {problem}"
    return CLEAN_ERROR, name


def classify_cli(status: int, stderr: str) -> tuple[str, str]:
    """(outcome, why) of moeedge.cli.main's exit status and what it wrote to stderr."""
    if status == 0:
        return SUCCESS, "exit status 0"
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr:
        return TRACEBACK, f"exit status {status} with a traceback on stderr"
    if status != 2:
        return TRACEBACK, f"exit status {status} (2 is bad input)"
    if len(lines) != 1:
        return TRACEBACK, f"exit status 2 with {len(lines)} lines on stderr"
    if not lines[0].startswith("moeedge: error: "):
        return TRACEBACK, "exit status 2 but stderr is not a 'moeedge: error: ' line"
    if len(lines[0]) > MAX_MESSAGE:
        return TRACEBACK, f"exit status 2 with a message of {len(lines[0])} characters"
    return CLEAN_ERROR, "exit status 2, one line"
