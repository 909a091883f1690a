"""The server's pieces without a server: text pieces and stop strings (serve.textstream),
and `moeedge serve` refusing what it cannot serve safely, in one line and exit 2."""
from __future__ import annotations

import json
import random

import pytest

import serve_fixtures as sf
from moeedge import cli
from moeedge.serve.textstream import TextStream
from moeedge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return sf.shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer({name: str(ckpt / name) for name in ("tokenizer.json", "tokenizer_config.json")})


def _run(stream: TextStream, ids: list[int]) -> tuple[list[str], str]:
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.flush())
    return pieces, "".join(pieces)


def test_pieces_join_to_the_whole_decode(tok):
    rng = random.Random(0)
    for _ in range(50):   # any ids, those that decode to nothing (specials, past the vocabulary) included
        ids = [rng.randrange(tok.vocab_size + 5) for _ in range(rng.randrange(1, 40))]
        assert _run(TextStream(tok, []), ids)[1] == tok.decode(ids)


def test_stop_string_is_held_back_then_cut(tok):
    ids = tok.encode("the quick brown fox jumps over the lazy dog", add_bos=False)
    whole = tok.decode(ids)
    for stop in ("brown", "fox j", "lazy dog", "o"):
        stream = TextStream(tok, ["never", stop])
        pieces, text = _run(stream, ids)
        assert text == whole[:whole.find(stop)] and stream.stopped
        assert not any(stop in p for p in pieces)
    pieces, text = _run(TextStream(tok, ["dogs"]), ids)   # a stop string's start at the end is given back
    assert text == whole


def test_half_a_character_waits_for_the_rest(tmp_path):
    from tokenizers import Tokenizer as HfTokenizer, decoders, models

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    hf = HfTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.ByteFallback()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer({"tokenizer.json": str(tmp_path / "tokenizer.json")})
    ids = list("é€".encode())   # 2 + 3 bytes, one token each
    pieces, text = _run(TextStream(tok, []), ids)
    assert text == "é€" and "\ufffd" not in text and pieces[0] == ""


def _serve(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["serve", *argv])
    return rc, capsys.readouterr().err


def test_a_chat_template_that_fails_in_the_sandbox_is_refused(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad-template"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "tokenizer_config.json").unlink()
    (bad / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>",
         "chat_template": "{% for i in range(10**9) %}{{ i }}{% endfor %}"}))
    rc, err = _serve(capsys, str(bad), "--port", "0", "--max-context", "64")
    assert rc == 2 and "refusing to serve: the chat template cannot be rendered safely" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, words", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--port", "70000"], "--port"),
    (["--max-body", "lots"], "lots"),
    (["--api-key", " "], "--api-key"),
    (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
])
def test_bad_flags_exit_2_in_one_line(flags, words, capsys):
    rc, err = _serve(capsys, *flags)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1


def test_a_request_samples_with_the_model_defaults_it_does_not_override():
    from moeedge.serve.schemas import CompletionRequest, RequestError, sampling_params

    defaults = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    plain = sampling_params(CompletionRequest(prompt="x"), defaults)
    assert (plain.temperature, plain.top_k, plain.top_p, plain.min_p) == (0.8, 40, 0.95, 0.05)
    greedy = sampling_params(CompletionRequest(prompt="x", temperature=0, top_k=1), defaults)
    assert (greedy.temperature, greedy.top_k, greedy.min_p) == (0.0, 1, 0.05)
    with pytest.raises(RequestError, match="top_p"):
        sampling_params(CompletionRequest(prompt="x", top_p=2.0), defaults)
