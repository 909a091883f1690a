"""Tokenizers from a checkpoint's own files: a sentencepiece tokenizer.model, and chat
templates rendered as transformers renders them."""
import json

import pytest

from moeedge.tokenizer import Tokenizer

TEXT = "def add(a, b):\n    return a + b  # the quick brown fox\n" * 30


@pytest.fixture(scope="module")
def sp_files(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}"}))
    return {"tokenizer.model": str(d / "tokenizer.model"), "tokenizer_config.json": str(d / "tokenizer_config.json")}


def test_sentencepiece_round_trip_with_bos(sp_files):
    tok = Tokenizer(sp_files)
    ids = tok.encode("return a + b")
    assert ids[0] == tok.bos_id == 1 and tok.eos_ids == [2]
    assert tok.decode(ids) == "return a + b"
    assert tok.decode(tok.encode("ünïcode ✓")) == "ünïcode ✓"  # byte fallback


def test_chat_template_is_rendered_and_bos_not_doubled(sp_files):
    tok = Tokenizer(sp_files)
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<s>[user] hi\n[assistant] "
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.count(tok.bos_id) == 1


def test_no_tokenizer_files_is_refused():
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer({})
