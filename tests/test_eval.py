"""moeedge eval: perplexity, and KL divergence and top-1 agreement against a reference,
on tiny seeded checkpoints."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeedge.cli import main
from moeedge.evaluate import corpus_windows, evaluate, text_windows
from moeedge.tokenizer import Tokenizer
from moeedge.data.corpus import HELD_OUT
from tiny_checkpoints import decoder_config, make_decoder, model_class, write_tokenizer

TEXT = ("experts route tokens; a cache keeps hot experts in memory while the rest stay on disk. "
        "the quick brown fox jumps over the lazy dog. hello world, how are you today? fine thanks. ") * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, transformers reference model) of a tiny Mixtral with a tokenizer."""
    directory = tmp_path_factory.mktemp("tiny")
    reference = make_decoder(directory, "mixtral", seed=4)
    write_tokenizer(directory)
    return directory, reference


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def run_json(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_model_against_itself_has_ratio_1_kl_0_agreement_1(tiny, text_file, capsys):
    directory, _ = tiny
    q = run_json(capsys, str(directory), "--reference", str(directory), "--text", str(text_file), "--window", "32")
    assert q["ppl_ratio"] == 1.0 and q["kl_mean"] == 0.0 and q["kl_p99"] == 0.0 and q["top1_agreement"] == 1.0
    assert q["ppl"] == q["ppl_reference"] > 1 and q["expert_bytes"] == q["expert_bytes_reference"] > 0
    assert q["windows"] > 1 and q["tokens"] > 32


def test_perplexity_equals_transformers_on_the_same_windows(tiny):
    directory, reference = tiny
    q = evaluate(directory, text=TEXT, window=32)
    windows = text_windows(Tokenizer({n: str(directory / n) for n in ("tokenizer.json", "tokenizer_config.json")}), TEXT, 16384, 32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = reference(torch.tensor([w])).logits[0, :-1]
            nll += float(F.cross_entropy(logits.double(), torch.tensor(w[1:]), reduction="sum"))
            count += len(w) - 1
    assert q.tokens == count and q.windows == len(windows)
    assert q.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert q.ppl_ratio is None and q.kl_mean is None


def test_the_default_text_is_the_held_out_corpus_and_calibration_never_sees_it():
    class Recording:
        eos_ids = [2]

        def __init__(self):
            self.texts = []

        def encode(self, text):
            self.texts.append(text)
            return [1] + [7] * (len(text) // 4)

    from moeedge.evaluate import _corpus

    corpus = _corpus()
    held_out = set(corpus.texts("heldout"))
    for split, n in (("heldout", 4096), ("train", 4096)):
        tok = Recording()
        windows = corpus_windows(tok, split, n, 256)
        assert n - 1 <= sum(map(len, windows)) <= n and max(map(len, windows)) <= 256
        assert len(tok.texts) >= 10  # a sample of many files, not the start of one
        assert all((t in held_out) == (split == "heldout") for t in tok.texts)
    assert all(f.path.split("/")[0] in HELD_OUT for f in corpus.split("heldout"))


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vocab192")
    cfg = decoder_config("mixtral")
    cfg.vocab_size = 192
    torch.manual_seed(0)
    model_class("mixtral")(cfg).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.mark.parametrize("case, message", [
    ("vocabulary", "different vocabularies (160 and 192 tokens)"),
    ("missing", "no such file"),
    ("short", "too short to evaluate"),
])
def test_bad_input_exits_2_with_one_line(tiny, other_vocabulary, tmp_path, capsys, case, message):
    directory, _ = tiny
    args = {"vocabulary": ["--reference", str(other_vocabulary)],
            "missing": ["--text", str(tmp_path / "nothing.txt")],
            "short": ["--text", str(tmp_path / "short.txt")]}[case]
    (tmp_path / "short.txt").write_text("")
    assert main(["eval", str(directory), *args, "--tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_text_output_names_every_figure(tiny, text_file, capsys):
    directory, _ = tiny
    assert main(["eval", str(directory), "--reference", str(directory), "--text", str(text_file)]) == 0
    out = capsys.readouterr().out
    for word in ("perplexity", "ratio 1.0000", "KL mean 0.0000", "top-1 agreement 100.00%", "expert bytes"):
        assert word in out
