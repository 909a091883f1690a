"""The chat loop in-process: Ctrl-C stops an answer, not the session; a conversation
too long for max_context is trimmed, oldest turns first."""
from __future__ import annotations

import io

import pytest

import moeedge
from moeedge.chat_cli import ChatSettings, run_chat
from tiny_checkpoints import make_decoder, write_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat")
    make_decoder(directory, "mixtral", seed=5)
    write_tokenizer(directory)
    with moeedge.load(directory, memory_budget="4GiB", max_context=64) as m:
        yield m


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_ctrl_c_stops_the_answer_not_the_session(model, monkeypatch):
    real_chat = model.chat
    calls = []

    def interrupted_chat(messages, stream=True, **kwargs):
        calls.append(len(messages))
        pieces = real_chat(messages, stream=True, **kwargs)
        if len(calls) == 1:
            yield next(pieces)
            raise KeyboardInterrupt
        yield from pieces

    monkeypatch.setattr(model, "chat", interrupted_chat)
    out = io.StringIO()
    settings = ChatSettings(5, {"temperature": 0})
    assert run_chat(model, settings, read=scripted(["hello", "again", "/quit"]), write=out) == 0
    assert "(stopped)" in out.getvalue()
    assert calls == [1, 3]  # the second turn sees the first question and the partial answer
    assert out.getvalue().count("tok/s") == 2


def test_long_conversation_is_trimmed_oldest_first(model, capsys):
    out = io.StringIO()
    long_line = "the quick brown fox jumps over the lazy dog " * 2
    run_chat(model, ChatSettings(8, {"temperature": 0}), read=scripted([long_line] * 4), write=out)
    assert "conversation trimmed" in capsys.readouterr().err
    assert out.getvalue().count("tok/s") == 4


def test_message_longer_than_context_is_refused_and_session_goes_on(model):
    out = io.StringIO()
    run_chat(model, ChatSettings(8, {"temperature": 0}), read=scripted(["word " * 200, "hi"]), write=out)
    assert "max_context is 64" in out.getvalue()
    assert out.getvalue().count("tok/s") == 1
