"""The full-size GGUF writer (moeedge.synthetic_gguf), at a tiny size of the same structure:
llama.cpp's own reader (gguf-py) and moeedge open what it writes, with llama.cpp's Q4_K_M
tensor types, finite scales, and a model that generates as its dequantized twin does."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import moeedge
from moeedge.formats.gguf_checkpoint import open_gguf
from moeedge.synthetic_gguf import main, tensor_type, use_more_bits, vocabulary, write

# llama.cpp's use_more_bits for Mixtral-8x7B's 32 layers, as the brief of this writer lists them
MORE_BITS_32 = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic-gguf")
    return (write(d / "q4_k_m.gguf", "tiny", "q4_k_m", seed=3),
            write(d / "q4_k_m-f32.gguf", "tiny", "q4_k_m", seed=3, dequantized=True))


def expected_q4_k_m(name: str, n_layers: int) -> str:
    if "norm" in name or "ffn_gate_inp" in name:
        return "F32"
    if "ffn_down_exps" in name:
        return "Q6_K" if use_more_bits(int(name.split(".")[1]), n_layers) else "Q4_K"
    for part, qtype in (("output.weight", "Q6_K"), ("attn_k.", "Q8_0"), ("attn_v.", "Q8_0"), ("attn_output", "Q5_K")):
        if name.startswith(part) or f".{part}" in name:
            return qtype
    return "Q4_K"


def test_use_more_bits_is_llama_cpps():
    assert [i for i in range(32) if use_more_bits(i, 32)] == MORE_BITS_32
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]  # n / 8 = 0: the last eighth and every third


def test_types_scales_and_spread_as_llama_cpp_reads_them(tiny):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(tiny[0])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == {name: expected_q4_k_m(name, 4) for name in types}
    assert {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "F32"} == set(types.values())
    scale_at = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}
    for t in reader.tensors:
        if t.tensor_type.name == "F32":
            assert np.isfinite(t.data).all()
            continue
        blocks = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
        for at in scale_at[t.tensor_type.name]:
            scales = blocks[:, at:at + 2].copy().view(np.float16)
            assert np.isfinite(scales).all(), t.name
        w = dequantize(np.asarray(t.data), t.tensor_type)
        assert 0.012 < w.std() < 0.03, (t.name, w.std())
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 512
    assert fields["llama.expert_count"].contents() == 8


def test_moeedge_generates_as_the_dequantized_twin(tiny):
    """Every K-quant kernel (Q4_K, Q5_K, Q6_K) and Q8_0 in one model against torch on the F32 twin:
    the kernels round activations to int16 per 32 values, so logits differ by rounding only."""
    ckpt = open_gguf(tiny[0])
    assert ckpt.config.n_layers == 4 and ckpt.config.n_experts == 8 and ckpt.config.vocab == 512
    assert [p.quant for p in ckpt.expert_parts[0]] == ["q4_k", "q4_k", "q4_k"]
    assert [p.quant for p in ckpt.expert_parts[3]] == ["q4_k", "q4_k", "q6_k"]
    ids = torch.arange(3, 15)
    with moeedge.load(tiny[1], memory_budget="8GiB") as model:
        expected = model.logits(ids)
        want = list(model.stream_ids(ids.tolist(), max_new_tokens=6, temperature=0))
    with moeedge.load(tiny[0], memory_budget="8GiB") as model:
        got = model.logits(ids)
        assert list(model.stream_ids(ids.tolist(), max_new_tokens=6, temperature=0)) == want
        assert model.tokenizer.decode(model.tokenizer.encode("hello world", add_bos=False)) == "hello world"
    assert (got - expected).abs().max() <= 2e-3 * expected.abs().max()


def test_q8_0_and_a_slice(tmp_path):
    import gguf

    path = write(tmp_path / "q8.gguf", "tiny", "q8_0", layers=2)
    reader = gguf.GGUFReader(path)
    assert {t.tensor_type.name for t in reader.tensors if "norm" not in t.name and "gate_inp" not in t.name} == {"Q8_0"}
    assert open_gguf(path).config.n_layers == 2
    assert tensor_type("blk.1.ffn_down_exps.weight", 2, "q4_k_m") == "Q6_K"  # the last eighth of 2 layers


def test_vocabulary_is_sentencepiece_shaped():
    tokens, scores, types = vocabulary(32000)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x41] == "<0x41>" and types[:4] == [2, 3, 3, 6]
    assert "▁" in tokens and all(a > b for a, b in zip(scores[259:], scores[260:]))


@pytest.mark.parametrize("args, message", [(["--layers", "0"], "--layers 0: a tiny model has 1 to 4 layers"),
                                           (["--layers", "5"], "--layers 5: a tiny model has 1 to 4 layers")])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "moeedge.synthetic_gguf", "--size", "tiny", "-o",
                          str(tmp_path / "x.gguf"), *args], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {message}"
    assert not list(tmp_path.iterdir())
    assert main(["--size", "tiny", "--layers", "0", "-o", str(tmp_path / "y.gguf")]) == 2
