"""The Switch trainer end to end at toy size: a few steps on a few stdlib files write a
directory that moeedge.load reads with transformers' logits and greedy tokens, and a run
stopped mid-way resumes to the same bytes as one that was never stopped."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

import moeedge  # noqa: E402
from moeedge.formats.open import open_hf_directory  # noqa: E402
from moeedge.tokenizer import Tokenizer  # noqa: E402
from moeedge.data.span_corruption import EOS_ID, SpanCorruption, sentinel, shift_right  # noqa: E402
from moeedge.train.switch_card import load_exported  # noqa: E402
from moeedge.train.switch_model import SwitchTrainConfig, train  # noqa: E402

STEPS = 4
CODE = 'import os\n\n\ndef read_lines(path):\n    """Lines of a file."""\n    with open(path) as f:\n' \
       '        return [line.rstrip() for line in f]\n\n\nclass Point:\n    def __init__(self, x, y):\n' \
       '        self.x, self.y = x, y\n'


def tiny(out: Path, **kw) -> SwitchTrainConfig:
    # A large learning rate and the full initialisation scale, so that four steps give
    # logits far enough from uniform for the comparisons below to mean something.
    return SwitchTrainConfig(**{**dict(out=out, d_model=32, d_kv=8, n_heads=4, d_ff=48, n_experts=8, vocab=512,
                                       seq_len=64, batch=4, steps=STEPS, lr=1e-2, warmup_steps=1, init_scale=1.0,
                                       limit_files=4, eval_examples=16, threads=1), **kw})


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("switch-straight")
    return out, train(tiny(out))


def corrupted_example(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """CODE tokenized by the written tokenizer, cut to 64 tokens and span-corrupted."""
    tok = Tokenizer({"tokenizer.model": str(out / "tokenizer.model")})
    ids = np.asarray((tok.encode(CODE, add_bos=False) * 4)[:64])
    inputs, targets = tiny(out).corruption.batch(ids[None], np.random.default_rng(3))
    return inputs[0], targets[0]


def test_run_writes_a_directory_moeedge_loads(straight):
    out, record = straight
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "README.md",
            "training.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "train_state").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["dtype"], config["num_experts"]) == ("switch_transformers", "float32", 8)
    assert (config["encoder_sparse_step"], config["decoder_sparse_step"]) == (2, 2)
    assert config["expert_capacity"] == math.ceil(1.25 * tiny(out).corruption.input_length / 8)
    ckpt = open_hf_directory(out)
    assert (ckpt.config.encoder_moe_blocks, ckpt.config.decoder_moe_blocks) == ([1, 3], [1, 3])
    figures = record["figures"]
    assert figures["moeedge"]["max_abs_logit_diff"] < 1e-4
    assert [e["layer"] for e in figures["experts"]] == ["encoder block 1", "encoder block 3",
                                                        "decoder block 1", "decoder block 3"]
    readme = (out / "README.md").read_text()
    assert f"{figures['loss']['model']['loss']:.3f}" in readme and "Routing predictability" in readme


def test_moeedge_logits_and_greedy_tokens_match_transformers(straight):
    out, _ = straight
    reference = load_exported(out)
    inputs, targets = corrupted_example(out)
    with torch.no_grad():
        expected = reference(input_ids=inputs[None], decoder_input_ids=shift_right(targets[None])).logits[0]
        greedy = reference.generate(inputs[None], max_new_tokens=12, do_sample=False)[0, 1:].tolist()
    greedy = greedy[:greedy.index(EOS_ID)] if EOS_ID in greedy else greedy
    assert expected.std() > 0.1  # not near-uniform logits, which would match anything
    with moeedge.load(out, max_context=256) as model:
        torch.testing.assert_close(model.logits(inputs, shift_right(targets[None])[0]), expected,
                                   atol=1e-5, rtol=1e-5)
        assert list(model.stream_ids(inputs.tolist(), max_new_tokens=12, temperature=0)) == greedy
        text = model.generate(CODE, max_new_tokens=8, temperature=0)
        assert "".join(model.stream(CODE, max_new_tokens=8, temperature=0)) == text and isinstance(text, str)


def test_tokenizer_has_t5_ids_and_sentinels_last(straight):
    out, _ = straight
    with moeedge.load(out, max_context=128) as model:
        tok = model.tokenizer
    assert (tok.bos_id, tok.eos_ids) == (None, [1])
    assert tok.encode(sentinel(0), add_bos=False) == [511]
    assert tok.encode(sentinel(99), add_bos=False) == [412]
    text = f"def f(x):{sentinel(0)}\n\treturn 'é ✓'{sentinel(1)}  # ü\r\n"
    assert tok.decode(tok.encode(text)) == text
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False).input_ids == tok.encode(text)


def test_span_corruption_is_t5s_and_reversible():
    corruption = SpanCorruption(256, 0.15, 3.0, 4096)
    assert (corruption.n_noise, corruption.n_spans, corruption.input_length, corruption.target_length) == \
        (38, 13, 231, 52)
    window = np.arange(1000, 1256)
    noise = corruption.noise_mask(np.random.default_rng(0))
    assert noise.sum() == 38 and not noise[0] and noise[-1]
    inputs, targets = corruption.apply(window, noise)
    assert len(inputs) == 231 and len(targets) == 52 and targets[0] == 4095 and targets[-1] == EOS_ID
    # Putting each span back in place of its sentinel gives the window back.
    spans = np.split(targets[:-1], np.flatnonzero(targets[:-1] >= 4096 - 100))[1:]
    restored = np.concatenate([spans[4095 - t][1:] if t >= 4096 - 100 else [t] for t in inputs])
    assert np.array_equal(restored, window)


def test_resume_continues_to_the_same_weights(straight, tmp_path):
    out, record = straight
    assert train(tiny(tmp_path, stop_after=2)) is None
    assert (tmp_path / "train_state" / "state.pt").is_file() and not (tmp_path / "config.json").exists()
    with pytest.raises(SystemExit, match="--resume"):
        train(tiny(tmp_path))
    resumed = train(tiny(tmp_path, resume=True))
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert [(e["step"], e["loss"]) for e in resumed["log"]] == [(e["step"], e["loss"]) for e in record["log"]]
    assert train(tiny(tmp_path, resume=True))["figures"] == resumed["figures"]  # done: nothing to resume


def test_a_budget_too_short_to_train_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="leaves no time to train"):
        train(tiny(tmp_path, steps=None, minutes=0.01))
