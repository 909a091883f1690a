"""Reference logits for an input that moeedge loaded: what another reader of the same
files computes. A Hugging Face directory: transformers' from_pretrained on it. A GGUF
file: the gguf package's GGUFReader, every tensor dequantized by gguf's own reference
code, the q/k rows unpermuted as llama.cpp's converter permuted them, the metadata read
as llama.cpp reads a llama-architecture MoE, and that model run by transformers'
Mixtral. Either returns None where the reference itself refuses the input: then there
is nothing to compare against."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

ATOL = 1e-3  # of the reference's largest |logit| (at least 1): fp32 on both sides, different kernels


def hf_logits(directory: str, ids: list[int], decoder_ids: list[int] | None) -> torch.Tensor | None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if decoder_ids is not None else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            if decoder_ids is not None:
                out = model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder_ids]))
            else:
                out = model(torch.tensor([ids]))
        return out.logits[0].float()
    except Exception:  # noqa: BLE001 -- transformers refusing the input is not moeedge's failure
        return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute (rows of each head interleaved for llama.cpp's RoPE)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
            "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
            "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
            "ffn_gate_inp.weight": "block_sparse_moe.gate.weight"}
EXPERT_NAMES = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}


def _hf_checkpoint_from_gguf(path: str, out: Path) -> None:
    """Write the GGUF's model as a Mixtral Hugging Face directory (raises where gguf cannot read it)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama" or not meta.get("llama.expert_count"):
        raise ValueError("not a llama-architecture MoE")
    hidden, heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "vocab_size": len(tokens) if isinstance(tokens, list) else int(meta["llama.vocab_size"]),
        "hidden_size": hidden, "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "num_local_experts": int(meta["llama.expert_count"]),
        "num_experts_per_tok": int(meta["llama.expert_used_count"]),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names, "dtype": "float32",
    }
    tensors = {}
    for t in reader.tensors:
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        values = values.reshape([int(d) for d in reversed(t.shape.tolist())])
        layer, _, short = t.name.removeprefix("blk.").partition(".")
        if t.name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = values
        elif t.name == "output_norm.weight":
            tensors["model.norm.weight"] = values
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = values
        elif short in HF_NAMES:
            if short == "attn_q.weight":
                values = _unpermute(values, heads)
            elif short == "attn_k.weight":
                values = _unpermute(values, kv_heads)
            tensors[f"model.layers.{int(layer)}.{HF_NAMES[short]}"] = values
        elif short in EXPERT_NAMES:
            for e, expert in enumerate(values):
                tensors[f"model.layers.{int(layer)}.block_sparse_moe.experts.{e}.{EXPERT_NAMES[short]}.weight"] = expert
        else:
            raise ValueError(f"tensor {t.name!r} has no place in a Mixtral")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))


def gguf_logits(path: str, ids: list[int]) -> torch.Tensor | None:
    from transformers import MixtralForCausalLM

    try:
        with tempfile.TemporaryDirectory(prefix="gguf-reference-") as tmp:
            _hf_checkpoint_from_gguf(path, Path(tmp))
            model = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0].float()
    except Exception:  # noqa: BLE001 -- the reference refusing the input leaves nothing to compare
        return None


def difference(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Why got is not the reference's logits (None: it is, within ATOL)."""
    if got.shape != expected.shape:
        return f"logits of shape {list(got.shape)}, the reference's {list(expected.shape)}"
    finite = torch.isfinite(expected)
    scale = max(1.0, float(expected[finite].abs().max())) if finite.any() else 1.0
    nan_got, nan_expected = int(torch.isnan(got).sum()), int(torch.isnan(expected).sum())
    if not torch.equal(torch.isnan(got), torch.isnan(expected)):
        return f"NaN in {nan_got} logits, the reference's in {nan_expected} (of {got.numel()})"
    if not torch.allclose(got, expected, rtol=0, atol=ATOL * scale, equal_nan=True):
        diff = (got - expected).abs().nan_to_num(0.0).max().item()
        return f"max |logit difference| {diff:.3g} (reference's largest |logit| {scale:.3g})"
    return None
