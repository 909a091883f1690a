"""GGUF files as llama.cpp and its converter write them, for Mixtral-style models
(architecture "llama" with llama.expert_count), Qwen2-MoE ("qwen2moe": a shared expert
beside the routed ones, q/k/v biases) and OLMoE ("olmoe": q/k norms). The metadata and the tensor table are
parsed and validated by moeedge.formats.gguf_file, the model they describe checked
here before anything is trusted; tensors are then located by absolute file offset and
read with pread, like safetensors.

Each layer's experts are stacked in one tensor per matrix, `blk.L.ffn_{gate,up,down}_exps`
([E, out, in] in torch order), so expert e is the e-th contiguous slice of each: three
byte ranges per expert, handed to the native cache as they lie in the file. Q8_0, Q4_0,
Q4_K, Q5_K and Q6_K tensors stay quantized, in the cache and in memory, and are multiplied as
stored by the native kernels (moeedge.kernels); a row is whole blocks, so each expert's
slice of a stacked tensor is too.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import torch

from moeedge.formats.checkpoint import Checkpoint, ExpertPart, StoredTensor
from moeedge.formats.config_fields import (MAX_CONTEXT, MAX_EXPERTS, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS,
                                           MAX_VOCAB, MAX_WIDTH, REQUIRED, Fields)
from moeedge.formats.errors import CheckpointError, shown, shown_name
from moeedge.formats.generation_config import gguf_sampling
from moeedge.formats.gguf_file import TYPES, GGUFFile, GGUFTensor, tensor_nbytes
from moeedge.formats.gguf_quants import dequantize
from moeedge.formats.gguf_split import read_gguf_model
from moeedge.formats.gguf_vocab import tokenizer_factory
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.formats.safetensors_file import TensorInfo, read_tensor
from moeedge.keys import ExpertKey
TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
             "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight"}
# GGUF architecture -> (moeedge family, its router's name, tensors only it has)
ARCHS = {
    "llama": ("mixtral", "block_sparse_moe.gate.weight", {}),
    "qwen2moe": ("qwen2_moe", "mlp.gate.weight", {
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
        "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
        "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
        "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"}),
    "olmoe": ("olmoe", "mlp.gate.weight", {
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}),
}
EXPERTS = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}
SUPPORTED_MODELS = ("architecture 'llama' with llama.expert_count (Mixtral), 'qwen2moe' (Qwen2-MoE) or 'olmoe' "
                    "(OLMoE), experts stacked in blk.N.ffn_*_exps")


def gguf_config(f: GGUFFile) -> DecoderConfig:
    """The model the metadata describes, every value checked before anything is sized by it."""
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHS:
        raise CheckpointError(f"{f.path}: GGUF architecture {shown(arch)} is not supported; "
                              f"supported: {SUPPORTED_MODELS}")
    if not f.metadata.get(f"{arch}.expert_count"):
        raise CheckpointError(f"{f.path}: a dense {arch} model (no {arch}.expert_count): moeedge runs Mixture-of-Experts "
                              f"models; supported: {SUPPORTED_MODELS}")
    scaling = f.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in f.tensors:
        raise CheckpointError(f"{f.path}: RoPE scaling ({shown(scaling)}, rope_freqs) is not supported "
                              f"(only the default RoPE)")
    m = Fields(f.metadata, f"{f.path}: GGUF metadata", f"{f.path}: GGUF metadata lacks")
    n_layers = m.count(f"{arch}.block_count", MAX_LAYERS)
    hidden, n_heads, n_kv, head_dim = _attention_shape(f, m, arch)
    n_experts, top_k = m.count(f"{arch}.expert_count", MAX_EXPERTS), m.count(f"{arch}.expert_used_count", MAX_EXPERTS)
    if top_k > n_experts:
        raise CheckpointError(f"{f.path}: inconsistent GGUF metadata: {n_experts=} {top_k=}")
    vocab = _vocab(f, m, arch)
    eos = [m.token_id(k, vocab) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in f.metadata]
    gate = f.tensors.get(f"blk.0.{EXPERTS['gate']}")
    _, dtype, _, _, _ = TYPES[gate.ggml_type] if gate else TYPES[0]
    qwen = arch == "qwen2moe"
    # The experts' width: expert_feed_forward_length where given (Qwen2-MoE), else the FFN's.
    # llama.cpp renormalises the top-k weights for Mixtral only (norm_w), as transformers
    # does by default (Qwen2-MoE's and OLMoE's norm_topk_prob is false).
    width_key = f"{arch}.expert_feed_forward_length"
    width = m.count(width_key if width_key in f.metadata else f"{arch}.feed_forward_length", MAX_WIDTH)
    return DecoderConfig(
        family=ARCHS[arch][0], n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, vocab=vocab, n_experts=n_experts, top_k=top_k,
        expert_intermediate=width, moe_layers=list(range(n_layers)),
        shared_expert_intermediate=m.count(f"{arch}.expert_shared_feed_forward_length", MAX_WIDTH) if qwen else 0,
        qkv_bias=qwen, norm_topk_prob=arch == "llama", rms_eps=m.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=m.number(f"{arch}.rope.freq_base", 10000.0),
        max_position=m.count(f"{arch}.context_length", MAX_CONTEXT, 4096),
        tie_embeddings="output.weight" not in f.tensors,
        bos_token_id=m.token_id("tokenizer.ggml.bos_token_id", vocab), eos_token_ids=list(dict.fromkeys(eos)),
        dtype=dtype)


def _attention_shape(f: GGUFFile, m: Fields, arch: str) -> tuple[int, int, int, int]:
    """(hidden, heads, kv heads, head dim), each checked and consistent."""
    hidden, n_heads = m.count(f"{arch}.embedding_length", MAX_WIDTH), m.count(f"{arch}.attention.head_count", MAX_HEADS)
    n_kv = m.count(f"{arch}.attention.head_count_kv", MAX_HEADS, n_heads)
    if n_heads % n_kv:
        raise CheckpointError(f"{f.path}: inconsistent GGUF metadata: {hidden=} {n_heads=} {n_kv=}")
    head_dim = m.count(f"{arch}.attention.key_length", MAX_HEAD_DIM, hidden // n_heads, minimum=0)
    if head_dim == 0 or head_dim % 2 or m.count(f"{arch}.attention.value_length", MAX_HEAD_DIM, head_dim) != head_dim:
        raise CheckpointError(f"{f.path}: head dimension {head_dim} (key_length/value_length) is not supported")
    rope_dim = m.count(f"{arch}.rope.dimension_count", MAX_HEAD_DIM, head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{f.path}: partial rotary embeddings ({arch}.rope.dimension_count {rope_dim}, "
                              f"head dimension {head_dim}) are not supported")
    return hidden, n_heads, n_kv, head_dim


def _vocab(f: GGUFFile, m: Fields, arch: str) -> int:
    """The embedded vocabulary's size, else ARCH.vocab_size, else the embedding's rows."""
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        if not 1 <= len(tokens) <= MAX_VOCAB:
            raise CheckpointError(f"{f.path}: GGUF metadata tokenizer.ggml.tokens lists {len(tokens)} tokens; "
                                  f"moeedge reads vocabularies of 1 to {MAX_VOCAB}")
        return len(tokens)
    embed = f.tensors.get("token_embd.weight")
    return m.count(f"{arch}.vocab_size", MAX_VOCAB, embed.shape[0] if embed else REQUIRED)


def _layer_names(cfg: DecoderConfig) -> dict[str, str]:
    """GGUF per-layer short name -> the Hugging Face name after model.layers.N., for cfg's family."""
    _, router, extra = next(a for a in ARCHS.values() if a[0] == cfg.family)
    return {**PER_LAYER, "ffn_gate_inp.weight": router, **extra}


def _expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """GGUF short name (without blk.N.) -> torch shape, of the tensors cfg's family has."""
    H, V, E, I, S = cfg.hidden, cfg.vocab, cfg.n_experts, cfg.expert_intermediate, cfg.shared_expert_intermediate
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (V, H), "output.weight": (V, H), "output_norm.weight": (H,),
              "attn_norm.weight": (H,), "ffn_norm.weight": (H,), "attn_q.weight": (q, H), "attn_k.weight": (kv, H),
              "attn_v.weight": (kv, H), "attn_output.weight": (H, q), "ffn_gate_inp.weight": (E, H),
              "ffn_gate_exps.weight": (E, I, H), "ffn_up_exps.weight": (E, I, H), "ffn_down_exps.weight": (E, H, I),
              "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "ffn_gate_inp_shexp.weight": (1, H),
              "ffn_gate_shexp.weight": (S, H), "ffn_up_shexp.weight": (S, H), "ffn_down_shexp.weight": (H, S),
              "attn_q_norm.weight": (q,), "attn_k_norm.weight": (kv,)}
    known = {*TOP_LEVEL, *_layer_names(cfg), *EXPERTS.values()}
    return {k: v for k, v in shapes.items() if k in known}


def _check_tensors(f: GGUFFile, cfg: DecoderConfig) -> dict[str, GGUFTensor]:
    """Every tensor known, present and of the shape the metadata implies; returns HF name -> dense tensor."""
    shapes, per_layer, dense = _expected_shapes(cfg), _layer_names(cfg), {}
    for name, t in f.tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        short = m.group(2) if m else name
        if m and (len(m.group(1)) > 9 or int(m.group(1)) >= cfg.n_layers) or short not in shapes:
            if re.fullmatch(r"ffn_(gate|up|down)\.\d+\.weight", short):
                raise CheckpointError(f"{f.path}: tensor {shown(name)}: one tensor per expert is an old GGUF layout; "
                                      f"supported: {SUPPORTED_MODELS} (convert again with a current llama.cpp)")
            raise CheckpointError(f"{f.path}: unexpected tensor {shown(name)} for a {cfg.n_layers}-layer model; "
                                  f"supported: {SUPPORTED_MODELS}, without biases or dense FFN layers")
        if t.shape != shapes[short]:
            raise CheckpointError(f"{f.path}: tensor {shown_name(name)} has shape {list(t.shape)} (GGUF dims "
                                  f"{list(reversed(t.shape))}); the metadata implies {list(shapes[short])}")
        if short in TOP_LEVEL:
            dense[TOP_LEVEL[short]] = t
        elif short in per_layer:
            dense[f"model.layers.{m.group(1)}.{per_layer[short]}"] = t
    wanted = [n for n in TOP_LEVEL if n != "output.weight"]
    wanted += [f"blk.{layer}.{short}" for layer in range(cfg.n_layers) for short in (*per_layer, *EXPERTS.values())]
    missing = [n for n in wanted if n not in f.tensors]
    if missing:
        raise CheckpointError(f"{f.path}: tensor {shown_name(missing[0])} is missing" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return dense


def _expert_layout(f: GGUFFile, cfg: DecoderConfig):
    ranges, parts = {}, {}
    for layer in range(cfg.n_layers):
        tensors = {role: f.tensors[f"blk.{layer}.{short}"] for role, short in EXPERTS.items()}
        layout, packed = [], 0
        for role, t in tensors.items():
            _, dtype, quant, _, _ = TYPES[t.ggml_type]
            per_expert = tensor_nbytes(t.ggml_type, t.shape[1:])
            # A quantized part is raw blocks (dtype uint8, nbytes of blocks), multiplied as stored.
            layout.append(ExpertPart(role, dtype, t.shape[1:], packed, per_expert, quant))
            packed += per_expert
        parts[layer] = layout
        for e in range(cfg.n_experts):
            ranges[ExpertKey(layer, e).packed] = [(t.file, t.offset + e * p.nbytes, p.nbytes)
                                                  for t, p in zip(tensors.values(), layout)]
    return ranges, parts


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: back to Hugging Face's rotary row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_dense(f: GGUFFile, cfg: DecoderConfig, dense: dict[str, GGUFTensor], name: str):
    """A dense tensor as held in memory: plain dtypes as stored, quantized matrices as their
    blocks (a QuantTensor, multiplied as stored by the native kernels)."""
    t = dense[name]
    _, dtype, quant, _, _ = TYPES[t.ggml_type]
    shape = (t.shape[0], t.nbytes // t.shape[0]) if quant else t.shape  # quantized rows: whole blocks each
    w = read_tensor(TensorInfo(t.name, f.paths[t.file], t.offset, t.nbytes, dtype, shape))
    if cfg.family == "mixtral" and name.endswith("q_proj.weight"):  # only LlamaModel permutes
        w = _unpermute(w, cfg.n_heads)
    elif cfg.family == "mixtral" and name.endswith("k_proj.weight"):
        w = _unpermute(w, cfg.n_kv_heads)
    if quant:
        if len(t.shape) != 2:
            return dequantize(w.reshape(-1), quant, t.shape, torch.float32)
        return QuantTensor(w.reshape(-1), quant, t.shape)
    return w


def _locate(f: GGUFFile, dense: dict[str, GGUFTensor], name: str) -> StoredTensor:
    t = dense[name]
    _, dtype, quant, _, _ = TYPES[t.ggml_type]
    return StoredTensor(TensorInfo(t.name, f.paths[t.file], t.offset, t.nbytes, dtype, t.shape), quant)


def open_gguf(path: str | os.PathLike) -> Checkpoint:
    f = read_gguf_model(Path(path))
    cfg = gguf_config(f)
    dense = _check_tensors(f, cfg)
    ranges, parts = _expert_layout(f, cfg)
    sampling = gguf_sampling(f.metadata, f.path)
    return Checkpoint(source=f.path, config=cfg, files=list(f.paths), expert_ranges=ranges, expert_parts=parts,
                      dense_names=sorted(dense), read_dense=functools.partial(_read_dense, f, cfg, dense),
                      dense_numel=sum(math.prod(t.shape) for t in dense.values()),
                      dense_nbytes=sum(t.nbytes for t in dense.values()),
                      tokenizer_factory=tokenizer_factory(f), locate=functools.partial(_locate, f, dense),
                      sampling=sampling, sampling_from=f"{f.path} (general.sampling.*)" if sampling else None)

