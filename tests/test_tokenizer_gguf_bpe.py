"""GGUF byte-level BPE tokenizers (tokenizer.ggml.model "gpt2") and Qwen2-MoE and OLMoE
GGUFs, on a tiny Qwen2-MoE and a tiny OLMoE converted by llama.cpp's own
convert_hf_to_gguf.py (tests/fixtures/make_bpe_ggufs.py made the fixtures: each .gguf,
the transformers tokenizer.json it was converted from, and transformers' token ids,
logits and greedy tokens)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import moeedge
import pytest
import torch
from gguf_fixtures import set_metadata_string
from moeedge.formats.errors import CheckpointError
from moeedge.formats.gguf_file import read_gguf
from moeedge.formats.open import open_checkpoint
from moeedge.tokenizer_gguf_bpe import GGUFBPETokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("qwen2moe", "olmoe")
GGUF = FIXTURES / "qwen2moe-bpe.gguf"
REFERENCE = json.loads((FIXTURES / "qwen2moe-bpe.json").read_text())
MORE_TEXTS = ["Hello, World! 1234567 apples", "  \n\t  mixed \r\n whitespace\n\n", "naïve café 東京 🙂",
              "x+=1; y-=22 // comment", "it's THEY'LL we'Re", "a  b   c    d", "trailing space "]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def models():
    loaded = {f: moeedge.load(FIXTURES / f"{f}-bpe.gguf", memory_budget="4GiB") for f in FAMILIES}
    yield loaded
    for m in loaded.values():
        m.close()


@pytest.fixture(scope="module")
def model(models):
    return models["qwen2moe"]


def _hf(family: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(FIXTURES / f"{family}-bpe.tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer():
    return _hf("qwen2moe")


def test_token_ids_equal_transformers(models, family):
    reference, hf, tok = json.loads((FIXTURES / f"{family}-bpe.json").read_text()), _hf(family), models[family].tokenizer
    assert reference["texts"] and len(reference["texts"]) == len(reference["ids"])
    for text, ids in zip(reference["texts"], reference["ids"]):
        assert tok.encode(text) == ids, text
    for text in MORE_TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_decode_inverts_encode(models, family):
    for text in MORE_TEXTS:
        assert models[family].tokenizer.decode(models[family].tokenizer.encode(text)) == text


def test_special_tokens_as_the_file_says(model, hf_tokenizer):
    tok = model.tokenizer
    im_end = hf_tokenizer.token_to_id("<|im_end|>")
    assert tok.bos_id is None  # no tokenizer.ggml.add_bos_token: llama.cpp adds none to a Qwen2 prompt
    assert tok.eos_ids == [im_end] and im_end in model.eos_ids
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids == hf_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                                      add_special_tokens=False).ids
    assert ids[0] == hf_tokenizer.token_to_id("<|im_start|>")
    assert tok.decode([im_end]) == ""  # control tokens are not text


def test_olmoe_end_of_sequence_as_the_file_says(models):
    tok = models["olmoe"].tokenizer
    assert tok.bos_id is None and tok.eos_ids == [_hf("olmoe").token_to_id("<|endoftext|>")]


def test_gguf_model_matches_transformers(models, family):
    """The model (Qwen2-MoE: shared expert, q/k/v biases; OLMoE: q/k norms) from the GGUF
    computes transformers' logits, and generates its greedy tokens through the file's tokenizer."""
    reference, model = json.loads((FIXTURES / f"{family}-bpe.json").read_text()), models[family]
    assert model.config.family == {"qwen2moe": "qwen2_moe", "olmoe": "olmoe"}[family]
    logits = model.logits(reference["prompt"])
    torch.testing.assert_close(logits, torch.tensor(reference["logits"]), atol=1e-3, rtol=0)
    assert list(model.stream_ids(reference["prompt"], 8, temperature=0.0)) == reference["greedy"]
    text = model.generate("def read_config(path):\n", max_new_tokens=8, temperature=0.0)
    # (a streamed text holds back a last incomplete UTF-8 character: random weights make bytes)
    assert text and model.tokenizer.decode(reference["greedy"]).startswith(text)


def _file_vocab():
    m = read_gguf(GGUF).metadata
    return m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"], m["tokenizer.ggml.merges"]


def _reference(split, ignore_merges=False):
    """The fixture's BPE with another pre-tokenizer, as a tokenizer.json would hold it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, types, merges = _file_vocab()
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != 5}
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=ignore_merges))
    tok.pre_tokenizer = split if split is not None else pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


# Llama 3's tokenizer.json expression, which llama.cpp rewrites without (?i:...)
LLAMA3_ORIGINAL = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_other_pre_tokenizers_equal_their_tokenizer_json(pre):
    from tokenizers import Regex, pre_tokenizers

    if pre == "gpt-2":  # GPT-2's own: byte-level with its expression
        reference = _reference(None)
    else:
        reference = _reference(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_ORIGINAL), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), ignore_merges=True)
    tokens, types, merges = _file_vocab()
    ours = GGUFBPETokenizer(tokens, types, merges, pre)
    for text in REFERENCE["texts"] + MORE_TEXTS:
        if "<|" in text or "\u0301" in text:
            continue  # added tokens and NFC: not part of these references
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, (pre, text)


@pytest.fixture
def damaged(tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(GGUF, path)
    return path


def test_unknown_pre_tokenizer_is_refused_by_name(damaged):
    set_metadata_string(damaged, "tokenizer.ggml.pre", "qwen9")
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.pre 'qwen9' is a pre-tokenizer moeedge does not "
                                              r"know; known: .*llama-bpe.*olmo.*qwen2"):
        open_checkpoint(damaged)


def test_bad_merges_are_refused():
    tokens, types, merges = _file_vocab()
    with pytest.raises(CheckpointError, match=r"merges holds 'nospace', not two tokens separated by a space"):
        GGUFBPETokenizer(tokens, types, [*merges, "nospace"], "qwen2")
    with pytest.raises(CheckpointError, match=r"tokens and merges do not make a BPE vocabulary"):
        GGUFBPETokenizer(tokens, types, [*merges, "zz\u0100 qq\u0101"], "qwen2")


@pytest.mark.slow  # runs llama.cpp's converter twice (each run imports torch and transformers)
def test_fixtures_are_what_the_converter_makes(tmp_path):
    """tests/fixtures/make_bpe_ggufs.py, run again, gives the committed tokenizers and tensor tables."""
    import subprocess
    import sys

    from gguf_fixtures import ConverterUnavailable, converter_dir

    try:
        converter_dir()
    except ConverterUnavailable as e:
        pytest.skip(str(e))
    subprocess.run([sys.executable, str(FIXTURES / "make_bpe_ggufs.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=600)
    for family in FAMILIES:
        made, kept = read_gguf(tmp_path / f"{family}-bpe.gguf"), read_gguf(FIXTURES / f"{family}-bpe.gguf")
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id", "general.architecture"):
            assert made.metadata[key] == kept.metadata[key], (family, key)
        assert {n: (t.shape, t.ggml_type) for n, t in made.tensors.items()} == \
               {n: (t.shape, t.ggml_type) for n, t in kept.tensors.items()}
        made_ref = json.loads((tmp_path / f"{family}-bpe.json").read_text())
        kept_ref = json.loads((FIXTURES / f"{family}-bpe.json").read_text())
        assert made_ref["texts"] == kept_ref["texts"] and made_ref["ids"] == kept_ref["ids"]
