"""What `moeedge chat` reads: several lines as one message (a trailing backslash, or a
\"\"\" block), line editing and history on a terminal (through a pty), --system and --stop."""
from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from moeedge.chat_input import MORE, PROMPT, read_message


def scripted(lines):
    it = iter(lines)
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    read.prompts = prompts
    return read


@pytest.mark.parametrize("lines, message", [
    (["hello"], "hello"),
    (["def f(x):\\", "    return x"], "def f(x):\n    return x"),
    (["a\\", "b\\", "c", "not read"], "a\nb\nc"),
    (['"""', "one", "", "two", '"""'], "one\n\ntwo"),
    (['"""first', 'last"""'], "first\nlast"),
    (['"""all on one line"""'], "all on one line"),
    (['"""', "cut short by the end of input"], "cut short by the end of input"),
    (['"""', "def f(path):", '    """Read it."""', "    return 1", '"""', "not read"],
     'def f(path):\n    """Read it."""\n    return 1'),  # a one-line docstring does not close the block
])
def test_multi_line_messages(lines, message):
    read = scripted(lines)
    assert read_message(read) == message
    assert read.prompts[0] == PROMPT and set(read.prompts[1:]) <= {MORE}


def test_end_of_input_before_a_message_is_eof():
    with pytest.raises(EOFError):
        read_message(scripted([]))


def test_system_message_opens_the_conversation_and_survives_reset(chat_model, tmp_path):
    saved, after_reset = tmp_path / "a.json", tmp_path / "b.json"
    script = f"hi\n/save {saved}\n/reset\n/save {after_reset}\n/quit\n"
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "chat", str(chat_model), "--max-new-tokens", "3",
                          "--system", "You are terse.", "--temperature", "0"],
                         input=script, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    first = json.loads(saved.read_text())["messages"]
    assert first[0] == {"role": "system", "content": "You are terse."} and first[1]["content"] == "hi"
    assert json.loads(after_reset.read_text())["messages"] == [first[0]]
    banner = run.stdout.splitlines()[0]
    assert banner.startswith(f"{chat_model.name}: ") and "budget" in banner and "expert cache" in banner
    assert "sampling: greedy" in run.stdout.splitlines()[1]


def test_stop_text_ends_the_answer(chat_model, tmp_path):
    import moeedge
    from moeedge.chat_cli import ChatSettings, run_chat

    with moeedge.load(chat_model, memory_budget="4GiB", max_context=64) as model:
        full = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=12, temperature=0)
        stop = full.strip()[2:4]
        assert stop, full
        out = io.StringIO()
        run_chat(model, ChatSettings(12, {"temperature": 0, "stop": [stop]}), read=scripted(["hi"]), write=out)
    answer = out.getvalue().splitlines()[3].removeprefix(PROMPT)  # after the banner, sampling and help lines
    assert stop not in answer and full.startswith(answer)


def test_the_bundled_model_says_what_it_is():
    import moeedge
    from moeedge.chat_cli import banner

    with moeedge.load(memory_budget="1GiB", max_context=64) as model:
        line = banner(model)
    assert line.startswith("moeedge default model: ") and "trained on Python's standard library" in line
    assert "budget 1.0 GiB" in line and "\n" not in line


def _pty_session(args, steps, timeout=90.0) -> str:
    """Run args on a pseudo-terminal; for each (marker, key) of steps, wait until the marker
    and then a prompt show, then type key. The screen's text."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(TERM="xterm", COLUMNS="200", LINES="50")
        os.execv(sys.executable, [sys.executable, *args])
    screen, seen, deadline = b"", 0, time.monotonic() + timeout
    try:
        for marker, key in steps:
            while (at := screen.find(marker, seen)) < 0 or screen.find(PROMPT.strip().encode(), at) < 0:
                screen += _read(fd, deadline)
            seen = screen.find(PROMPT.strip().encode(), at) + 1
            os.write(fd, key)
        while chunk := _read(fd, deadline, allow_eof=True):
            screen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, screen.decode(errors="replace")
    return screen.decode(errors="replace")


def _read(fd, deadline, allow_eof=False) -> bytes:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    assert ready, "the chat did not answer in time"
    try:
        return os.read(fd, 65536)
    except OSError:  # the child closed the terminal
        if allow_eof:
            return b""
        raise


def test_line_editing_and_history_on_a_terminal(chat_model, tmp_path):
    saved = tmp_path / "conv.json"
    left, up = b"\x1b[D", b"\x1b[A"
    keys = [(b"commands:", b"hello" + left * 2 + b"Z\r"), (b"tok/s", up + b"\r"),
            (b"tok/s", f"/save {saved}\r".encode()), (b"(saved", b"/quit\r")]
    screen = _pty_session(["-m", "moeedge.cli", "chat", str(chat_model), "--max-new-tokens", "2",
                           "--temperature", "0"], keys)
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["helZlo", "helZlo"], screen  # the arrow moved the cursor; the up arrow recalled the line
    assert "^[[D" not in screen
