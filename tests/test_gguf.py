"""GGUF checkpoints written by llama.cpp's own converter run with moeedge as the
transformers model they came from, experts evicting on every layer.

Tolerances on the logits (|logit| up to about 2.4, std 0.65 for this model), against
the fp32 transformers model:
- f32: the same weights; only the order of float sums differs. Measured ~1e-6.
- f16: every weight rounded to 11 significant bits (relative error <= 2**-11), so
  logits move by ~1e-3 (measured 1.3e-3); 5e-3 allowed.
- bf16: 8 significant bits (<= 2**-8), 8x f16's error (measured 1.2e-2); 4e-2 allowed.
- q8_0: weights d * q with d = max|w| / 127 over each block of 32, so each weight is off
  by up to d / 2, about 0.4% of its block's largest (measured 4.1e-2, mean 7.6e-3);
  0.12 allowed, with the mean abs diff under 0.02. Undoing the q/k row permutation
  wrongly, by contrast, gives errors of about 0.9.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import gguf_fixtures as gf
from conftest import kernel_path
import moeedge
from moeedge import _core
from moeedge.formats.errors import CheckpointError
from moeedge.formats.gguf_checkpoint import open_gguf
from moeedge.formats.gguf_quants import BLOCKS, dequantize
from moeedge.formats.safetensors_file import read_header, read_tensor

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 4e-2, "q8_0": 0.12}
IDS = torch.randint(3, gf.VOCAB, (24,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def converter():
    try:
        return gf.converter_dir()
    except gf.ConverterUnavailable as e:
        pytest.skip(f"llama.cpp's converter is not available: {e}")


@pytest.fixture(scope="session")
def mixtral(tmp_path_factory):
    """(Hugging Face directory, fp32 transformers reference)."""
    directory = tmp_path_factory.mktemp("mixtral-hf")
    return directory, gf.make_mixtral(directory)


@pytest.fixture(scope="session")
def ggufs(converter, mixtral) -> dict:
    return gf.convert_all(converter, mixtral[0], OUTTYPES)


@pytest.fixture
def damaged(ggufs, tmp_path):
    """A private copy of a converted file, to break."""
    def copy(outtype: str = "f32"):
        path = tmp_path / f"model-{outtype}.gguf"
        shutil.copyfile(ggufs[outtype], path)
        return path
    return copy


def tight(model):
    """Cache room for exactly one layer's top-k experts: every layer evicts the last one's."""
    slot = model.cache.store.slot_bytes(model.cache.store.keys()[0])
    model.cache.set_budget(model.config.top_k * slot)
    return model


# --------------------------------------------------------------------------- the model

@pytest.mark.parametrize("outtype", OUTTYPES)
def test_logits_match_transformers_with_evictions(ggufs, mixtral, outtype):
    _, reference = mixtral
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    with tight(moeedge.load(ggufs[outtype], memory_budget="8GiB")) as model:
        got = model.logits(IDS)
        stats = model.stats()
    diff = (got - expected).abs()
    assert diff.max() <= TOLERANCE[outtype], f"{outtype}: max abs diff {diff.max():.3g}"
    assert diff.mean() <= TOLERANCE[outtype] / 6, f"{outtype}: mean abs diff {diff.mean():.3g}"
    assert stats["evictions"] > 0 and stats["misses"] > 0


def test_q8_0_greedy_tokens_match_transformers(ggufs, mixtral):
    # Six steps: at the seventh the reference's top two logits are 0.0017 apart, a tie at Q8_0 precision.
    _, reference = mixtral
    prompt = IDS[:5]
    with torch.no_grad():
        expected = reference.generate(prompt[None], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 5:].tolist()
    with tight(moeedge.load(ggufs["q8_0"], memory_budget="8GiB")) as model:
        model.config.eos_token_ids, model.tokenizer.eos_ids = [], []
        assert list(model.stream_ids(prompt.tolist(), max_new_tokens=6, temperature=0)) == expected


def test_config_from_metadata(ggufs, mixtral):
    hf = mixtral[1].config
    cfg = open_gguf(ggufs["f32"]).config
    assert (cfg.family, cfg.n_layers, cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab) == \
        ("mixtral", hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
         hf.hidden_size // hf.num_attention_heads, hf.vocab_size)
    assert (cfg.n_experts, cfg.top_k, cfg.expert_intermediate, cfg.moe_layers) == \
        (hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size, list(range(hf.num_hidden_layers)))
    assert cfg.rms_eps == pytest.approx(hf.rms_norm_eps) and cfg.max_position == hf.max_position_embeddings
    assert cfg.rope_theta == (getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta})["rope_theta"]
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.tie_embeddings) == (1, [2], False)


def test_dense_tensors_and_experts_are_the_hugging_face_ones(ggufs, mixtral):
    """f32: every dense tensor under its Hugging Face name (q/k rows un-permuted), and each
    expert's byte ranges are exactly that expert's w1/w3/w2."""
    directory, _ = mixtral
    hf = read_header(directory / "model.safetensors")
    ckpt = open_gguf(ggufs["f32"])
    experts = {n for n in hf if ".experts." in n}
    assert sorted(ckpt.dense_names) == sorted(set(hf) - experts)
    for name in ckpt.dense_names:
        assert torch.equal(ckpt.read_dense(name), read_tensor(hf[name])), name
    data = ggufs["f32"].read_bytes()
    for layer, e in [(0, 0), (1, 5), (2, 3)]:
        segments = ckpt.expert_ranges[ckpt.expert_key(layer, e)]
        for (_, offset, length), part, w in zip(segments, ckpt.expert_parts[layer], ("w1", "w3", "w2")):
            got = torch.frombuffer(bytearray(data[offset:offset + length]), dtype=torch.float32).view(part.shape)
            want = read_tensor(hf[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"])
            assert torch.equal(got, want), (layer, e, w)


def test_q8_0_experts_stay_quantized_in_the_cache(ggufs, mixtral):
    directory, _ = mixtral
    hf = read_header(directory / "model.safetensors")
    ckpt = open_gguf(ggufs["q8_0"])
    parts = ckpt.expert_parts[1]
    assert [(p.role, p.quant, p.dtype) for p in parts] == [(r, "q8_0", torch.uint8) for r in ("gate", "up", "down")]
    assert all(p.nbytes == 96 * 64 // 32 * 34 for p in parts)  # blocks, not floats
    assert ckpt.expert_nbytes == 3 * 6 * 3 * 96 * 64 // 32 * 34
    data = ggufs["q8_0"].read_bytes()
    _, offset, length = ckpt.expert_ranges[ckpt.expert_key(1, 4)][2]  # down
    raw = torch.frombuffer(bytearray(data[offset:offset + length]), dtype=torch.uint8)
    got = dequantize(raw, "q8_0", parts[2].shape, torch.float32)
    want = read_tensor(hf["model.layers.1.block_sparse_moe.experts.4.w2.weight"])
    # Each weight within half a quantisation step (max |w| of its block / 127), plus the fp16 rounding of the step.
    step = want.view(-1, 32).abs().amax(-1, keepdim=True) / 127
    assert ((got - want).view(-1, 32).abs() <= 0.6 * step).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])
def test_dequantize_matches_gguf_reference(quant, dtype):
    """Random bytes, so every quant, scale and min value occurs; finite fp16 scales."""
    from gguf.quants import dequantize as reference

    block, block_bytes = BLOCKS[quant]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(40, block_bytes), dtype=np.uint8)
    for at in {"q8_0": [0], "q4_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}[quant]:
        blocks[:, at:at + 2] = rng.normal(0, 0.01, size=(40, 1)).astype(np.float16).view(np.uint8)
    shape = (10, 4 * block)
    want = torch.from_numpy(reference(blocks.reshape(-1), gf._qtype(quant)).copy()).view(shape)
    got = dequantize(torch.from_numpy(blocks.reshape(-1)), quant, shape, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype), atol=0, rtol=0)


def test_q4_0_round_trip_through_gguf_quantize():
    """gguf's Q4_0 quantizer read back. d = the block's largest-magnitude weight / -8 and
    weights d * (q - 8), q in 0..15, span -8d (that weight) to 7d: each weight within half a
    step |d| / 2 of one, or within a step where beyond 7 steps on the other side (clipped),
    plus d's fp16 rounding (relative 2**-11, times up to 8 steps)."""
    from gguf.quants import quantize

    w = np.random.default_rng(1).normal(0, 1, (6, 64)).astype(np.float32).reshape(-1, 32)
    raw = torch.from_numpy(quantize(w.reshape(6, 64), gf._qtype("q4_0")).reshape(-1).copy())
    got = dequantize(raw, "q4_0", (6, 64), torch.float32).numpy().reshape(-1, 32)
    largest = np.take_along_axis(w, np.abs(w).argmax(1)[:, None], 1)  # signed, [blocks, 1]
    step = np.abs(largest) / 8
    clipped = w * np.sign(largest) < -7.5 * step
    assert (np.abs(got - w) <= np.where(clipped, step, step / 2) + 8 * step * 2 ** -10).all()


@pytest.mark.parametrize("quant", ["q4_0", "q4_k", "q5_k", "q6_k"])
def test_quantized_experts_stay_quantized_and_logits_match_the_dequantized_model(tmp_path, quant):
    """A tiny Mixtral whose experts and dense matrices are Q4_0, Q4_K (with a Q6_K output, as
    Q4_K_M has), Q5_K or Q6_K, run by the native kernels on both paths, against the same model stored
    as F32 (torch on the dequantized weights). The kernels round activations to int16 per 32
    values (about 2**-16 of each block's largest): measured 3e-4 at most on these logits of
    std 1.4; a wrong nibble or scale order gives errors of order 1."""
    path, dequantized = gf.quantized_mixtral(tmp_path, quant)
    ckpt = open_gguf(path)
    assert {p.quant for parts in ckpt.expert_parts.values() for p in parts} == {quant}
    assert ckpt.expert_nbytes == 3 * 2 * 4 * 256 * 256 // BLOCKS[quant][0] * BLOCKS[quant][1]
    ids = torch.randint(0, gf.KQUANT_MIXTRAL["vocab"], (12,), generator=torch.Generator().manual_seed(0))
    with moeedge.load(dequantized, memory_budget="8GiB") as model:
        expected = model.logits(ids)
    for name in _core.linear_paths():
        with kernel_path(name):
            with tight(moeedge.load(path, memory_budget="8GiB")) as model:
                got = model.logits(ids)  # 12 tokens: every product goes through the native kernels
                assert model.stats()["evictions"] > 0
        diff = (got - expected).abs()
        assert diff.max() <= 3e-3, f"{quant} on the {name} path: max abs diff {diff.max():.3g}"


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_agrees_with_sentencepiece(ggufs, mixtral):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mixtral[0] / "tokenizer.model"))
    tok = open_gguf(ggufs["q8_0"]).tokenizer_factory()
    texts = [gf.TEXT, "Hello world,  two  spaces, 1234 digits\nand a newline", " leading and trailing ",
             "Zürich, naïve, 東京 ☃ (byte fallback)", "", "a"]
    for text in texts:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode("hello") == [1] + sp.encode("hello") and tok.bos_id == 1 and tok.eos_ids == [2]


def test_chat_markers_are_single_tokens(ggufs, mixtral):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mixtral[0] / "tokenizer.model"))
    tok = open_gguf(ggufs["q8_0"]).tokenizer_factory()
    user, assistant = (tok.token_id(t) for t in gf.CHAT_TOKENS)
    ids = tok.encode_chat([{"role": "user", "content": "hello world"}])
    assert ids == [1, user] + sp.encode("hello world") + [assistant]
    assert tok.decode(ids) == "hello world"


def test_load_generates_text_with_the_embedded_tokenizer(ggufs):
    with moeedge.load(ggufs["q8_0"], memory_budget="8GiB") as model:
        text = model.generate("the quick brown fox", max_new_tokens=4, temperature=0)
        reply = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=3, temperature=0)
    assert isinstance(text, str) and isinstance(reply, str)


# --------------------------------------------------------------------------- bad input

def test_truncated_file_names_the_tensor(damaged):
    path = damaged()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)
    with pytest.raises(CheckpointError, match=r"model-f32\.gguf: tensor '[\w.]+' .* ends past the end of the file .*truncated"):
        moeedge.load(path, memory_budget="8GiB")


def test_truncated_header(damaged):
    path = damaged()
    with open(path, "r+b") as f:
        f.truncate(3000)  # inside the token list
    with pytest.raises(CheckpointError, match=r"model-f32\.gguf: corrupt GGUF header .*past the end of the file"):
        open_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        open_gguf(path)


def test_tensor_offset_past_the_end(damaged):
    path = damaged()
    gf.set_tensor_offset(path, "blk.1.ffn_down_exps.weight", 1 << 40)
    with pytest.raises(CheckpointError, match=r"model-f32\.gguf: tensor 'blk\.1\.ffn_down_exps\.weight' .* ends past the end"):
        open_gguf(path)


def test_misaligned_tensor_offset(damaged):
    path = damaged()
    gf.set_tensor_offset(path, "blk.0.attn_q.weight", 4)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_q\.weight' at data offset 4 is not aligned to 32 bytes"):
        open_gguf(path)


def test_overlapping_tensors(damaged):
    path = damaged()
    gf.set_tensor_offset(path, "blk.2.attn_v.weight", 0)  # where output.weight lies
    with pytest.raises(CheckpointError, match=r"tensors '[\w.]+' and '[\w.]+' overlap"):
        open_gguf(path)


def test_unsupported_quant_type(damaged):
    path = damaged("q8_0")
    gf.set_tensor_type(path, "blk.0.ffn_gate_exps.weight", 11)  # Q3_K
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate_exps\.weight' is Q3_K, .*"
                                              r"supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K"):
        moeedge.load(path, memory_budget="8GiB")


def test_unsupported_architecture(damaged):
    path = damaged()
    gf.set_metadata_string(path, "general.architecture", "gemma")
    with pytest.raises(CheckpointError,
                       match=r"architecture 'gemma' is not supported; supported: architecture 'llama'"):
        moeedge.load(path, memory_budget="8GiB")


def test_dense_llama_is_refused(damaged):
    path = damaged()
    gf.rename_metadata_key(path, "llama.expert_count", "llama.expert_cnt_x")
    with pytest.raises(CheckpointError, match=r"a dense llama model \(no llama\.expert_count\)"):
        open_gguf(path)
