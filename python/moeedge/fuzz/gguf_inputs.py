"""Input class (e): GGUF files. Structure-aware mutations change one field of a
GGUFSpec -- a metadata value or its type, the header's counts, a tensor's dimensions,
type, offset or name -- and the writer lays out the rest as given, lies included;
byte-level ones flip, overwrite and truncate the written file's header region."""
from __future__ import annotations

import copy
import random
import struct

from moeedge.fuzz import gguf_file as G
from moeedge.fuzz.inputs import FuzzInput, pick_target
from moeedge.fuzz.mutate import INTERESTING_FLOATS, INTERESTING_INTS, INTERESTING_STRINGS, mutate_bytes
from moeedge.fuzz.seeds import Seeds

# The keys a loader must distrust most: sizes and counts.
COUNT_KEYS = ("llama.block_count", "llama.expert_count", "llama.expert_used_count", "llama.embedding_length",
              "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.context_length", "llama.vocab_size", "llama.rope.dimension_count", "general.alignment",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
EXTRA_KEYS = (G.KV("llama.attention.key_length", G.UINT32, 6), G.KV("llama.attention.value_length", G.UINT32, 16),
              G.KV("llama.rope.scaling.type", G.STRING, "linear"), G.KV("general.architecture", G.STRING, "qwen2moe"),
              G.KV("tokenizer.ggml.eot_token_id", G.UINT32, 10**6), G.KV("tokenizer.ggml.model", G.STRING, "gpt2"),
              G.KV("llama.expert_count", G.UINT32, 0), G.KV("general.alignment", G.UINT32, 0))
GGML_TYPES = (0, 1, 2, 3, 6, 8, 10, 12, 14, 16, 30, 31, 39, 99, 2**31, 2**32 - 1)


def _new_value(rng: random.Random, kv: G.KV) -> str:
    """Change kv's value (same type) or its type; returns the description."""
    if isinstance(kv.value, G.Raw):  # changed already: other bytes
        kv.value = G.Raw(bytes(rng.randrange(256) for _ in range(rng.choice((0, 4, 8, 16)))))
        return f"{kv.key}: value bytes = {kv.value.data.hex()}"
    op = rng.random()
    if op < 0.2:  # another type, the value as it is (wrapped to the new width by the writer)
        kv.vtype = rng.choice((G.UINT8, G.INT32, G.UINT64, G.FLOAT32, G.FLOAT64, G.BOOL, G.STRING, G.ARRAY, 13, 99))
        if kv.vtype == G.STRING and not isinstance(kv.value, str):
            kv.value = str(kv.value)[:100]
        elif kv.vtype in (G.FLOAT32, G.FLOAT64, G.UINT8, G.INT32, G.UINT64, G.BOOL) and not isinstance(
                kv.value, (int, float)):
            kv.value = len(kv.value) if hasattr(kv.value, "__len__") else 0
        elif kv.vtype == G.ARRAY and not isinstance(kv.value, list):
            kv.value, kv.elem_type = [kv.value], G.STRING if isinstance(kv.value, str) else G.UINT32
        elif kv.vtype in (13, 99):
            kv.value = G.Raw(b"\0" * 8)
        return f"{kv.key}: type -> {kv.vtype}"
    if kv.vtype == G.ARRAY:
        items = list(kv.value)
        choice = rng.randrange(6)
        if choice == 0:
            kv.value = items[: rng.randrange(len(items) + 1)]
        elif choice == 1:
            kv.value = items + items[: rng.randrange(1, len(items) + 1)]
        elif choice == 2:
            kv.value = []
        elif choice == 3 and items:
            i = rng.randrange(len(items))
            items[i] = (rng.choice(INTERESTING_STRINGS) if kv.elem_type == G.STRING else
                        rng.choice(INTERESTING_FLOATS) if kv.elem_type in (G.FLOAT32, G.FLOAT64) else
                        rng.choice(INTERESTING_INTS))
            kv.value = items
        elif choice == 4:
            kv.elem_type = rng.choice((G.UINT8, G.INT32, G.FLOAT32, G.STRING, G.ARRAY, G.BOOL, 13, 99))
            kv.value = G.Raw(struct.pack("<IQ", kv.elem_type & 0xFFFFFFFF, len(items)) + b"\0" * (8 * len(items)))
            return f"{kv.key}: element type -> {kv.elem_type}"
        else:  # the count claims more than the file holds
            count = rng.choice((len(items) + 1, 2**32, 2**62, 2**64 - 1))
            kv.value = G.Raw(struct.pack("<IQ", kv.elem_type, count) + G.value_bytes(kv)[12:])
            return f"{kv.key}: array count field = {count} (holds {len(items)})"
        return f"{kv.key}: array of {len(kv.value)} elements"
    if kv.vtype == G.STRING:
        if rng.random() < 0.3:  # a length field that lies
            length = rng.choice((2**32, 2**63, 2**64 - 1, len(kv.value) + 1))
            kv.value = G.Raw(struct.pack("<Q", length) + kv.value.encode())
            return f"{kv.key}: string length field = {length}"
        kv.value = rng.choice(INTERESTING_STRINGS + ("llama", "mixtral", "x" * 10**6, "\udcff"))
        return f"{kv.key} = {kv.value[:40]!r}"
    if kv.vtype in (G.FLOAT32, G.FLOAT64):
        kv.value = rng.choice(INTERESTING_FLOATS)
        return f"{kv.key} = {kv.value}"
    kv.value = rng.choice(INTERESTING_INTS + (kv.value + 1, kv.value - 1, kv.value * 2))
    return f"{kv.key} = {kv.value}"


def _mutate_metadata(spec: G.GGUFSpec, rng: random.Random) -> str:
    op = rng.random()
    if op < 0.45:
        kv = spec.kv(rng.choice(COUNT_KEYS))
        return _new_value(rng, kv)
    if op < 0.75:
        return _new_value(rng, rng.choice(spec.kvs))
    if op < 0.85:
        kv = spec.kvs.pop(rng.randrange(len(spec.kvs)))
        return f"{kv.key}: deleted"
    if op < 0.92:
        kv = copy.deepcopy(rng.choice(EXTRA_KEYS))
        spec.kvs.insert(rng.randrange(len(spec.kvs) + 1), kv)
        return f"added {kv.key} = {kv.value!r}"
    kv = copy.deepcopy(rng.choice(spec.kvs))
    spec.kvs.append(kv)
    return f"{kv.key}: twice"


def _mutate_tensor(spec: G.GGUFSpec, rng: random.Random) -> str:
    i = rng.randrange(len(spec.tensors))
    t = spec.tensors[i]
    name = t.name if isinstance(t.name, str) else repr(t.name)
    op = rng.randrange(8)
    if op == 0:
        if t.dims:
            d = rng.randrange(len(t.dims))
            t.dims[d] = rng.choice(INTERESTING_INTS + (t.dims[d] * 2, t.dims[d] + 1, t.dims[d] // 2)) % 2**64
        return f"{name}: dims = {t.dims}"
    if op == 1:
        t.dims = rng.choice((t.dims + [1], t.dims + [2], t.dims[:-1], [], t.dims * 2, list(reversed(t.dims))))
        return f"{name}: dims = {t.dims}"
    if op == 2:
        t.n_dims = rng.choice((0, 5, 255, 2**31, 2**32 - 1, len(t.dims) + 1))
        return f"{name}: n_dims field = {t.n_dims} (dims listed: {len(t.dims)})"
    if op == 3:
        t.ggml_type = rng.choice(GGML_TYPES)
        return f"{name}: ggml type = {t.ggml_type}"
    if op == 4:
        other = rng.choice(spec.tensors).offset
        t.offset = rng.choice((t.offset + 1, t.offset + 32, 0, other, len(spec.data), len(spec.data) + 32,
                               2**40, 2**63, 2**64 - 32))
        return f"{name}: offset = {t.offset}"
    if op == 5:
        t.name = rng.choice((b"\xff\xfe", "", "blk.99.attn_q.weight", "blk.0.ffn_gate.0.weight", "x" * 10**5,
                             "rope_freqs.weight", "blk.-1.attn_q.weight", rng.choice(spec.tensors).name))
        return f"{name}: renamed to {str(t.name)[:40]}"
    if op == 6:
        spec.tensors.pop(i)
        return f"{name}: deleted from the table"
    spec.tensors.append(copy.deepcopy(t))
    return f"{name}: listed twice"


def gguf_input(rng: random.Random, seeds: Seeds) -> FuzzInput:
    seed = rng.choice(sorted(seeds.gguf))
    spec = copy.deepcopy(seeds.gguf[seed])
    target = pick_target(rng, "chat" if rng.random() < 0.1 else "load")
    op = rng.random()
    if op < 0.35:
        description = "; ".join(_mutate_metadata(spec, rng) for _ in range(rng.choice((1, 1, 2))))
    elif op < 0.65:
        description = "; ".join(_mutate_tensor(spec, rng) for _ in range(rng.choice((1, 1, 2))))
    elif op < 0.73:
        field = rng.choice(("n_tensors", "n_kvs", "version", "magic"))
        value = (rng.choice((b"GGUF", b"GGML", b"FUGG", b"\0\0\0\0")) if field == "magic" else
                 rng.choice((0, 1, 2, 4, 2**31, 2**32 - 1)) if field == "version" else
                 rng.choice((0, 1, 2**31, 2**32, 2**62, 2**64 - 1, len(spec.tensors) + 1, len(spec.kvs) + 1)))
        setattr(spec, field, value)
        description = f"header {field} = {value!r}"
    else:
        data = G.to_bytes(spec)
        header_end = len(data) - len(spec.data)
        if op < 0.83:
            at = rng.choice((0, 4, 16, 24, rng.randrange(24, header_end), header_end, rng.randrange(len(data))))
            new, description = data[:at], f"truncated to {at} of {len(data)} bytes"
        else:
            new, description = mutate_bytes(data, rng, region=(0, header_end))
            description += " (in the header and tables)"
        return FuzzInput("", 0, seed, f"{seed}.gguf: {description}", target, {"model.gguf": new})
    return FuzzInput("", 0, seed, f"{seed}.gguf: {description}", target, {"model.gguf": G.to_bytes(spec)})
