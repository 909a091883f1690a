"""What `moeedge chat` reads: lines with editing and history on a terminal (prompt_toolkit),
plain lines from a pipe, and messages over several lines as llama.cpp and Ollama take
them (a line ending in a backslash goes on; \"\"\" opens and closes a block)."""
from __future__ import annotations

import sys
from collections.abc import Callable

PROMPT = ">>> "
MORE = "... "
FENCE = '"""'

Read = Callable[[str], str]  # input()'s contract: a line without its newline; EOFError, KeyboardInterrupt


def line_reader(stdin=None, stdout=None) -> Read:
    """prompt_toolkit's editing (arrows, Ctrl-A/E, Ctrl-R through this session's history)
    on a terminal; input() otherwise (a pipe, a file), which readline improves where present."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if stdin.isatty() and stdout.isatty():
        try:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory
        except ImportError:
            pass
        else:
            session = PromptSession(history=InMemoryHistory())
            return lambda prompt: session.prompt(prompt)
    try:
        import readline  # noqa: F401 (input() edits lines through it once imported)
    except ImportError:
        pass
    return input


def read_message(read: Read) -> str:
    """One message: a line, or several joined by newlines (backslash continuations, or a
    \"\"\" block). EOFError at the end of input; KeyboardInterrupt drops a half-typed message."""
    line = read(PROMPT)
    if line.lstrip().startswith(FENCE):
        return _fenced(read, line.lstrip()[len(FENCE):])
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read(MORE)
        except EOFError:
            line = ""
    lines.append(line)
    return "\n".join(lines)


def _closes(line: str) -> bool:
    """Whether a line ends a triple-quoted block: it ends in triple quotes that none earlier
    on the line opened (a one-line Python docstring does not end the block)."""
    line = line.rstrip()
    return line.endswith(FENCE) and line.count(FENCE) % 2 == 1


def _fenced(read: Read, first: str) -> str:
    """The rest of a triple-quoted block, whose opening line's remainder is first."""
    if _closes(first):  # opened and closed on one line
        return first.rstrip()[:-len(FENCE)]
    lines = [first] if first else []
    while True:
        try:
            line = read(MORE)
        except EOFError:  # input ended inside the block: send what there is
            break
        if _closes(line):
            lines.append(line.rstrip()[:-len(FENCE)])
            break
        lines.append(line)
    return "\n".join(lines).strip("\n")
