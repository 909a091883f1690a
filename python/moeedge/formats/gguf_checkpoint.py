"""GGUF files as llama.cpp and its converter write them, for Mixtral-style models
(architecture "llama" with llama.expert_count). The metadata and the tensor table are
parsed with gguf's GGUFReader and validated here before anything is trusted; tensors
are then located by absolute file offset and read with pread, like safetensors.

Each layer's experts are stacked in one tensor per matrix, `blk.L.ffn_{gate,up,down}_exps`
([E, out, in] in torch order), so expert e is the e-th contiguous slice of each: three
byte ranges per expert, handed to the native cache as they lie in the file. Q8_0, Q4_0,
Q4_K and Q6_K tensors stay quantized, in the cache and in memory, and are multiplied as
stored by the native kernels (moeedge.kernels); a row is whole blocks, so each expert's
slice of a stacked tensor is too.
"""
from __future__ import annotations

import functools
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeedge.formats.checkpoint import Checkpoint, ExpertPart, StoredTensor
from moeedge.formats.errors import CheckpointError
from moeedge.formats.gguf_quants import dequantize
from moeedge.kernels import QuantTensor
from moeedge.formats.hf_config import DecoderConfig
from moeedge.formats.safetensors_file import TensorInfo, read_tensor
from moeedge.keys import ExpertKey

GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version, tensor count, metadata count
MAX_DIMS = 4       # GGML_MAX_DIMS

# ggml type id -> (name, dtype of its bytes, quant, weights per block, bytes per block)
TYPES = {
    0: ("F32", torch.float32, None, 1, 4),
    1: ("F16", torch.float16, None, 1, 2),
    30: ("BF16", torch.bfloat16, None, 1, 2),
    8: ("Q8_0", torch.uint8, "q8_0", 32, 34),
    2: ("Q4_0", torch.uint8, "q4_0", 32, 18),
    12: ("Q4_K", torch.uint8, "q4_k", 256, 144),
    14: ("Q6_K", torch.uint8, "q6_k", 256, 210),  # Q4_K_M files mix Q4_K and Q6_K (and keep some F32)
}
SUPPORTED_TYPES = ", ".join(t[0] for t in TYPES.values())

TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
             "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
             "ffn_gate_inp.weight": "block_sparse_moe.gate.weight"}
EXPERTS = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}
SUPPORTED_MODELS = "architecture 'llama' with llama.expert_count (Mixtral), experts stacked in blk.N.ffn_*_exps"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: GGUF lists ne[0], the innermost dimension, first
    offset: int             # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPES[self.ggml_type][0]


@dataclass
class GGUFFile:
    path: str
    metadata: dict
    tensors: dict[str, GGUFTensor]


def _nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    _, _, _, block, block_bytes = TYPES[ggml_type]
    return math.prod(shape) // block * block_bytes


# --------------------------------------------------------------------------- the file

def _checked_reader_class():
    from gguf import GGUFReader, GGUFValueType  # noqa: PLC0415 (only GGUF files need the package)

    class CheckedReader(GGUFReader):
        """GGUFReader that refuses reads past the end of the file (a corrupt length would
        otherwise loop or read garbage), reads arrays in bulk (element by element, a
        32000-token vocabulary takes seconds), and records the tensor table unmapped: we
        validate it ourselves, so that errors can name the tensor."""

        def _get(self, offset, dtype, count=1, override_order=None):
            count, itemsize = int(count), np.dtype(dtype).itemsize
            if offset < 0 or count < 0 or offset + count * itemsize > len(self.data):
                raise ValueError(f"reading {count} x {np.dtype(dtype).name} at offset {offset} runs past the end "
                                 f"of the file ({len(self.data)} bytes; truncated?)")
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            n, itype = int(alen[0]), GGUFValueType(int(raw_itype[0]))
            if n > len(self.data) - orig_offs:  # every element takes at least one byte
                raise ValueError(f"an array at offset {orig_offs} claims {n} elements, more than the file holds")
            types = [GGUFValueType.ARRAY, itype]
            scalar = self.gguf_scalar_to_np.get(itype)
            if scalar is not None:  # numbers: one part holds them all; contents() lists them
                values = self._get(orig_offs + 12, scalar, n)
                return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
            if itype != GGUFValueType.STRING or self.byte_order != "I" or sys.byteorder != "little":
                return super()._get_field_parts(orig_offs, raw_type)
            parts, end = self._strings(orig_offs + 12, n)
            return end - orig_offs, [raw_itype, alen, *parts], list(range(3, 2 + len(parts), 2)), types

        def _strings(self, offs: int, n: int):
            """n strings from offs: [length, bytes] parts per string, and where they end."""
            data = self.data.view(np.ndarray)  # slices of a plain array, not of the memmap: 5x faster
            size, view, parts = len(data), memoryview(data), []
            for _ in range(n):
                length = struct.unpack_from("<Q", view, offs)[0] if offs + 8 <= size else size
                if offs + 8 + length > size:
                    raise ValueError(f"a string at offset {offs} runs past the end of the file ({size} bytes)")
                parts += [data[offs:offs + 8], data[offs + 8:offs + 8 + length]]
                offs += 8 + length
            return parts, offs

        def _build_tensors(self, start_offs, fields):
            self.tensor_fields = fields

    return CheckedReader


def _field_value(field):
    """A metadata value as Python data (what ReaderField.contents() gives in newer gguf releases)."""
    from gguf import GGUFValueType  # noqa: PLC0415

    main, last = field.types[0], field.types[-1]
    if main == GGUFValueType.ARRAY and last == GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    if main == GGUFValueType.ARRAY:
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's metadata and tensor table; CheckpointError names the file and tensor."""
    path = str(path)
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    if len(head) < HEADER_BYTES or head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file ({size} bytes, starts with {head[:4]!r}, not {GGUF_MAGIC!r})")
    try:
        reader = _checked_reader_class()(path)
        metadata = {name: _field_value(field) for name, field in reader.fields.items() if field.types}
        fields = [(bytes(p[1]), int(p[2][0]), [int(d) for d in p[3]], int(p[4][0]), int(p[5][0]))
                  for p in (f.parts for f in reader.tensor_fields)]
        alignment, data_offset = int(reader.alignment), int(reader.data_offset)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt GGUF header ({e})") from None
    finally:
        reader = None  # drop the file mapping: tensors are read with pread
    tensors: dict[str, GGUFTensor] = {}
    for raw_name, n_dims, ne, ggml_type, rel in fields:
        t = _tensor(path, raw_name, n_dims, ne, ggml_type, rel, alignment, data_offset, size)
        if t.name in tensors:
            raise CheckpointError(f"{path}: tensor {t.name!r} appears twice")
        tensors[t.name] = t
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap")
    return GGUFFile(path, metadata, tensors)


def _tensor(path, raw_name, n_dims, ne, ggml_type, rel, alignment, data_offset, size) -> GGUFTensor:
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: tensor name {raw_name[:64]!r} is not UTF-8") from None
    if not 1 <= n_dims <= MAX_DIMS or any(d < 1 for d in ne) or math.prod(ne) >= 1 << 62:
        raise CheckpointError(f"{path}: tensor {name!r} has invalid dimensions {ne}")
    if ggml_type not in TYPES:
        from gguf import GGMLQuantizationType  # noqa: PLC0415

        try:
            found = GGMLQuantizationType(ggml_type).name
        except ValueError:
            found = f"ggml type id {ggml_type}"
        raise CheckpointError(f"{path}: tensor {name!r} is {found}, which moeedge does not read; "
                              f"supported: {SUPPORTED_TYPES} (requantize, e.g. llama-quantize ... Q4_K_M)")
    type_name, _, _, block, _ = TYPES[ggml_type]
    if ne[0] % block:
        raise CheckpointError(f"{path}: tensor {name!r} is {type_name} with rows of {ne[0]} weights, "
                              f"not whole {block}-weight blocks")
    shape = tuple(reversed(ne))
    nbytes = _nbytes(ggml_type, shape)
    if rel % alignment:
        raise CheckpointError(f"{path}: tensor {name!r} at data offset {rel} is not aligned to {alignment} bytes")
    offset = data_offset + rel
    if offset + nbytes > size:
        raise CheckpointError(f"{path}: tensor {name!r} ({type_name}{list(shape)}, {nbytes} bytes at offset {offset}) "
                              f"ends past the end of the file ({size} bytes; truncated?)")
    return GGUFTensor(name, ggml_type, shape, offset, nbytes)


# --------------------------------------------------------------------------- the model

def _meta(f: GGUFFile, key: str, default=None, kind=int):
    value = f.metadata.get(key, default)
    if value is None:
        raise CheckpointError(f"{f.path}: GGUF metadata lacks {key}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise CheckpointError(f"{f.path}: GGUF metadata {key} = {value!r} is not a non-negative integer")
    if kind is float and not isinstance(value, (int, float)):
        raise CheckpointError(f"{f.path}: GGUF metadata {key} = {value!r} is not a number")
    return value


def gguf_config(f: GGUFFile) -> DecoderConfig:
    arch = f.metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_MODELS}")
    if not f.metadata.get("llama.expert_count"):
        raise CheckpointError(f"{f.path}: a dense llama model (no llama.expert_count): moeedge runs Mixture-of-Experts "
                              f"models; supported: {SUPPORTED_MODELS}")
    scaling = f.metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in f.tensors:
        raise CheckpointError(f"{f.path}: RoPE scaling ({scaling!r}, rope_freqs) is not supported "
                              f"(only the default RoPE)")
    hidden, n_heads = _meta(f, "llama.embedding_length"), _meta(f, "llama.attention.head_count")
    n_kv = _meta(f, "llama.attention.head_count_kv", n_heads)
    n_experts, top_k = _meta(f, "llama.expert_count"), _meta(f, "llama.expert_used_count")
    if not (n_heads and n_kv and hidden and n_heads % n_kv == 0 and 0 < top_k <= n_experts):
        raise CheckpointError(f"{f.path}: inconsistent GGUF metadata: {hidden=} {n_heads=} {n_kv=} "
                              f"{n_experts=} {top_k=}")
    head_dim = _meta(f, "llama.attention.key_length", hidden // n_heads)
    if head_dim == 0 or head_dim % 2 or _meta(f, "llama.attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{f.path}: head dimension {head_dim} (key_length/value_length) is not supported")
    rope_dim = _meta(f, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{f.path}: partial rotary embeddings (llama.rope.dimension_count {rope_dim}, "
                              f"head dimension {head_dim}) are not supported")
    embed = f.tensors.get("token_embd.weight")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) else _meta(f, "llama.vocab_size", embed and embed.shape[0])
    bos = _meta(f, "tokenizer.ggml.bos_token_id") if "tokenizer.ggml.bos_token_id" in f.metadata else None
    eos = [_meta(f, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in f.metadata]
    gate = f.tensors.get(f"blk.0.{EXPERTS['gate']}")
    _, dtype, quant, _, _ = TYPES[gate.ggml_type] if gate else TYPES[0]
    n_layers = _meta(f, "llama.block_count")
    return DecoderConfig(
        family="mixtral", n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab=vocab, n_experts=n_experts, top_k=top_k, expert_intermediate=_meta(f, "llama.feed_forward_length"),
        moe_layers=list(range(n_layers)), norm_topk_prob=True,
        rms_eps=float(_meta(f, "llama.attention.layer_norm_rms_epsilon", 1e-5, float)),
        rope_theta=float(_meta(f, "llama.rope.freq_base", 10000.0, float)),
        max_position=_meta(f, "llama.context_length", 4096), tie_embeddings="output.weight" not in f.tensors,
        bos_token_id=bos, eos_token_ids=list(dict.fromkeys(eos)),
        dtype=dtype)


def _expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """GGUF short name (without blk.N.) -> torch shape."""
    H, V, E, I = cfg.hidden, cfg.vocab, cfg.n_experts, cfg.expert_intermediate
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"token_embd.weight": (V, H), "output.weight": (V, H), "output_norm.weight": (H,),
            "attn_norm.weight": (H,), "ffn_norm.weight": (H,), "attn_q.weight": (q, H), "attn_k.weight": (kv, H),
            "attn_v.weight": (kv, H), "attn_output.weight": (H, q), "ffn_gate_inp.weight": (E, H),
            "ffn_gate_exps.weight": (E, I, H), "ffn_up_exps.weight": (E, I, H), "ffn_down_exps.weight": (E, H, I)}


def _check_tensors(f: GGUFFile, cfg: DecoderConfig) -> dict[str, GGUFTensor]:
    """Every tensor known, present and of the shape the metadata implies; returns HF name -> dense tensor."""
    shapes, dense = _expected_shapes(cfg), {}
    for name, t in f.tensors.items():
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        short = m.group(2) if m else name
        if m and int(m.group(1)) >= cfg.n_layers or short not in shapes:
            if re.fullmatch(r"ffn_(gate|up|down)\.\d+\.weight", short):
                raise CheckpointError(f"{f.path}: tensor {name!r}: one tensor per expert is an old GGUF layout; "
                                      f"supported: {SUPPORTED_MODELS} (convert again with a current llama.cpp)")
            raise CheckpointError(f"{f.path}: unexpected tensor {name!r} for a {cfg.n_layers}-layer model; "
                                  f"supported: {SUPPORTED_MODELS}, without biases or dense FFN layers")
        if t.shape != shapes[short]:
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(t.shape)} (GGUF dims "
                                  f"{list(reversed(t.shape))}); the metadata implies {list(shapes[short])}")
        if short in TOP_LEVEL:
            dense[TOP_LEVEL[short]] = t
        elif short in PER_LAYER:
            dense[f"model.layers.{m.group(1)}.{PER_LAYER[short]}"] = t
    wanted = [n for n in TOP_LEVEL if n != "output.weight"]
    wanted += [f"blk.{layer}.{short}" for layer in range(cfg.n_layers) for short in (*PER_LAYER, *EXPERTS.values())]
    missing = [n for n in wanted if n not in f.tensors]
    if missing:
        raise CheckpointError(f"{f.path}: tensor {missing[0]!r} is missing" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return dense


def _expert_layout(f: GGUFFile, cfg: DecoderConfig):
    ranges, parts = {}, {}
    for layer in range(cfg.n_layers):
        tensors = {role: f.tensors[f"blk.{layer}.{short}"] for role, short in EXPERTS.items()}
        layout, packed = [], 0
        for role, t in tensors.items():
            _, dtype, quant, _, _ = TYPES[t.ggml_type]
            per_expert = _nbytes(t.ggml_type, t.shape[1:])
            # A quantized part is raw blocks (dtype uint8, nbytes of blocks), multiplied as stored.
            layout.append(ExpertPart(role, dtype, t.shape[1:], packed, per_expert, quant))
            packed += per_expert
        parts[layer] = layout
        for e in range(cfg.n_experts):
            ranges[ExpertKey(layer, e).packed] = [(0, t.offset + e * p.nbytes, p.nbytes)
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
    w = read_tensor(TensorInfo(t.name, f.path, t.offset, t.nbytes, dtype, shape))
    if name.endswith("q_proj.weight"):
        w = _unpermute(w, cfg.n_heads)
    elif name.endswith("k_proj.weight"):
        w = _unpermute(w, cfg.n_kv_heads)
    if quant:
        if len(t.shape) != 2:
            return dequantize(w.reshape(-1), quant, t.shape, torch.float32)
        return QuantTensor(w.reshape(-1), quant, t.shape)
    return w


def _locate(f: GGUFFile, dense: dict[str, GGUFTensor], name: str) -> StoredTensor:
    t = dense[name]
    _, dtype, quant, _, _ = TYPES[t.ggml_type]
    return StoredTensor(TensorInfo(t.name, f.path, t.offset, t.nbytes, dtype, t.shape), quant)


def _tokenizer_factory(f: GGUFFile):
    """The tokenizer embedded in the file, for sentencepiece-style ("llama") vocabularies; None for others."""
    m = f.metadata
    if m.get("tokenizer.ggml.model") != "llama":
        return None
    tokens, scores, types = (m.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if not (isinstance(tokens, list) and isinstance(scores, list) and isinstance(types, list)
            and len(tokens) == len(scores) == len(types) and all(isinstance(t, str) for t in tokens)
            and all(isinstance(x, (int, float)) for x in scores) and all(isinstance(t, int) for t in types)):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens (strings), scores (numbers) and token_type "
                              f"(integers) are missing, of other types or differ in length")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in m and not (isinstance(m[key], int) and 0 <= m[key] < len(tokens)):
            raise CheckpointError(f"{f.path}: {key} = {m[key]!r} is not a token id (vocabulary of {len(tokens)})")
    from moeedge.tokenizer_gguf import GGUFTokenizer  # noqa: PLC0415

    eos = [m[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in m]
    return functools.partial(GGUFTokenizer, tokens, scores, types, bos_id=m.get("tokenizer.ggml.bos_token_id"),
                             eos_ids=list(dict.fromkeys(eos)),
                             add_bos=bool(m.get("tokenizer.ggml.add_bos_token", True)),
                             add_space_prefix=bool(m.get("tokenizer.ggml.add_space_prefix", True)),
                             chat_template=m.get("tokenizer.chat_template"))


def open_gguf(path: str | os.PathLike) -> Checkpoint:
    f = read_gguf(Path(path))
    cfg = gguf_config(f)
    dense = _check_tensors(f, cfg)
    ranges, parts = _expert_layout(f, cfg)
    return Checkpoint(source=f.path, config=cfg, files=[f.path], expert_ranges=ranges, expert_parts=parts,
                      dense_names=sorted(dense), read_dense=functools.partial(_read_dense, f, cfg, dense),
                      dense_numel=sum(math.prod(t.shape) for t in dense.values()),
                      dense_nbytes=sum(t.nbytes for t in dense.values()),
                      tokenizer_factory=_tokenizer_factory(f), locate=functools.partial(_locate, f, dense))
