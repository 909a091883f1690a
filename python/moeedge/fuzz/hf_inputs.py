"""Input classes over a Hugging Face checkpoint directory: (a) a safetensors header,
(b) model.safetensors.index.json, (c) config.json, (d) tokenizer files. Each mixes
structure-aware mutations (a field of the parsed JSON) with byte-level ones, and
sometimes puts a special file (a FIFO, a directory, a link to /dev/zero) in a file's place."""
from __future__ import annotations

import json
import random

from moeedge.fuzz.inputs import Directory, Fifo, FuzzInput, Sparse, Symlink, WithOutside, pick_target
from moeedge.fuzz.mutate import (INTERESTING_INTS, dump_json, interesting_value, json_paths, mutate_bytes,
                                 mutate_json)
from moeedge.fuzz.seeds import Seeds

SPECIAL_FILES = (Fifo(), Directory(), Sparse(2**36), Sparse(2**31 + 8), Symlink("/dev/zero"), Symlink("/dev/null"),
                 Symlink("/proc/self/mem"), Symlink("/proc/self/environ"), Symlink("does-not-exist"), b"")


def _special(rng: random.Random, name: str) -> tuple[object, str]:
    content = rng.choice(SPECIAL_FILES)
    if isinstance(content, Symlink):
        return content, f"{name} is a symlink to {content.target}"
    if isinstance(content, Sparse):
        return content, f"{name} is a sparse file of {content.size} bytes"
    label = {Fifo: "a FIFO", Directory: "a directory", bytes: "an empty file"}[type(content)]
    return content, f"{name} is {label}"


def _read(seeds: Seeds, seed: str, name: str) -> bytes:
    return (seeds.hf[seed] / name).read_bytes()


# --------------------------------------------------------------------------- (a) safetensors header

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header_json: bytes, body: bytes) -> bytes:
    header_json += b" " * (-len(header_json) % 8)  # as safetensors pads it
    return len(header_json).to_bytes(8, "little") + header_json + body


def _mutate_entry(header: dict, rng: random.Random) -> str:
    names = [n for n in header if n != "__metadata__" and isinstance(header[n], dict)
             and {"dtype", "shape", "data_offsets"} <= header[n].keys()]
    if not names:  # an earlier mutation of this input left no whole entry
        header[rng.choice(list(header) or ["x"])] = value = interesting_value(rng)
        return f"an entry = {str(value)[:60]}"
    name = rng.choice(names)
    entry = header[name]
    what = rng.randrange(9)
    if what == 0:
        entry["dtype"] = rng.choice(("F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "Q4_0", "", 5,
                                     None, ["F32"]))
        return f"{name}: dtype = {entry['dtype']!r}"
    if what == 1:
        shape = list(entry["shape"])
        op = rng.randrange(5)
        if op == 0 and shape:
            i = rng.randrange(len(shape))
            shape[i] = interesting_value(rng, shape[i])
        elif op == 1:
            shape.append(rng.choice((1, 2, 0, 2**40)))
        elif op == 2:
            shape = shape[:-1]
        elif op == 3:
            shape = list(reversed(shape))  # a transpose: the same bytes, the wrong layout
        else:
            shape = interesting_value(rng)
        entry["shape"] = shape
        return f"{name}: shape = {str(shape)[:60]}"
    if what == 2:
        offsets = list(entry["data_offsets"])
        op = rng.randrange(4)
        if op == 0:
            i = rng.randrange(2)
            offsets[i] = interesting_value(rng, offsets[i])
        elif op == 1:
            offsets.reverse()
        elif op == 2:  # another tensor's bytes
            offsets = list(header[rng.choice(names)]["data_offsets"])
        else:
            offsets = interesting_value(rng)
        entry["data_offsets"] = offsets
        return f"{name}: data_offsets = {str(offsets)[:60]}"
    if what == 3:
        del header[name]
        return f"{name}: deleted"
    if what == 4:
        new = rng.choice((name + ".x", name.replace("layers.0", "layers.7"), "", name.upper()))
        header[new] = header.pop(name)
        return f"{name}: renamed to {new!r}"
    if what == 5:
        header["__metadata__"] = interesting_value(rng)
        return f"__metadata__ = {str(header['__metadata__'])[:60]}"
    if what == 6:
        header[name] = interesting_value(rng)
        return f"{name}: entry = {str(header[name])[:60]}"
    paths = [p for p in json_paths(header) if p[:1] == (name,)]
    _, description = mutate_json(header, rng, paths)
    return description


def safetensors_input(rng: random.Random, seeds: Seeds) -> FuzzInput:
    seed = rng.choice(("mixtral", "qwen2_moe", "olmoe", "switch", "mixtral-sharded"))
    files = sorted(p.name for p in seeds.hf[seed].glob("*.safetensors"))
    name = rng.choice(files)
    data = _read(seeds, seed, name)
    header, body = split_safetensors(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    op = rng.random()
    if op < 0.06:  # the file itself, or another one the directory listing picks up, not a regular file
        new_name = rng.choice((name, name, "extra.safetensors"))
        content, description = _special(rng, new_name)
        return FuzzInput("", 0, seed, description, pick_target(rng, "load"), {new_name: content})
    if op < 0.5:
        descriptions = [_mutate_entry(header, rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        new, description = join_safetensors(dump_json(header), body), "; ".join(descriptions)
    elif op < 0.62:
        value = rng.choice((0, 1, 2, header_end - 9, header_end - 7, len(data), len(data) - 8, 2**63, 2**64 - 1,
                            (100 << 20) + 1, rng.choice(INTERESTING_INTS) % 2**64))
        new, description = value.to_bytes(8, "little") + data[8:], f"header length field = {value}"
    elif op < 0.74:
        at = rng.choice((0, 4, 8, rng.randrange(8, header_end), header_end, rng.randrange(header_end, len(data)),
                         len(data) - 1))
        new, description = data[:at], f"truncated to {at} of {len(data)} bytes"
    elif op < 0.9:
        new, description = mutate_bytes(data, rng, region=(8, header_end))
        description += " (in the header)"
    else:
        donor = _read(seeds, "olmoe" if seed != "olmoe" else "mixtral", "model.safetensors")
        new, description = mutate_bytes(data, rng, donor=donor)
    return FuzzInput("", 0, seed, f"{name}: {description}", pick_target(rng, "load"), {name: new})


# --------------------------------------------------------------------------- (b) the shard index

INDEX = "model.safetensors.index.json"
BAD_SHARD_NAMES = ("../outside.safetensors", "{outside_abs}", "../../../../../etc/passwd", "/etc/passwd",
                   "/dev/zero", "/proc/self/mem", "", ".", "..", "missing.safetensors", "sub/../../outside.safetensors",
                   "model.safetensors\u0000.txt", "config.json", "tokenizer.json", 5, None, ["a"], {"a": 1}, True)


def index_input(rng: random.Random, seeds: Seeds) -> FuzzInput:
    seed = "mixtral-sharded"
    index = json.loads(_read(seeds, seed, INDEX))
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    shard = rng.choice(shards)
    files: dict = {}
    outside: dict = {}
    op = rng.random()
    if op < 0.4:  # every tensor of one shard pointed elsewhere
        bad = rng.choice(BAD_SHARD_NAMES)
        if bad in ("../outside.safetensors", "{outside_abs}", "sub/../../outside.safetensors"):
            outside["outside.safetensors"] = _read(seeds, seed, shard)  # a real shard, outside the checkpoint
        for tensor, where in weight_map.items():
            if where == shard:
                weight_map[tensor] = bad
        description = f"weight_map: the tensors of {shard} -> {bad!r}"
    elif op < 0.55:  # the shard itself replaced
        files[shard], description = _special(rng, shard)
        if rng.random() < 0.3:
            files[shard], description = None, f"{shard} deleted"
    elif op < 0.65:
        index["weight_map"] = interesting_value(rng)
        description = f"weight_map = {str(index['weight_map'])[:60]}"
    elif op < 0.72:  # many names: what an error message listing them does
        n = rng.choice((1000, 100000))
        weight_map.update({f"t{i}": f"missing-{i}.safetensors" for i in range(n)})
        description = f"weight_map names {n} missing shards"
    elif op < 0.85:
        _, description = mutate_json(index, rng)
    else:
        raw, description = mutate_bytes(dump_json(index), rng)
        files[INDEX] = raw
        return FuzzInput("", 0, seed, f"{INDEX}: {description}", pick_target(rng, "load"), files, outside)
    files.setdefault(INDEX, dump_json(index).replace(b'"{outside_abs}"', b'"{outside}/outside.safetensors"'))
    if b"{outside}" in files[INDEX]:
        files[INDEX] = WithOutside(files[INDEX])
    return FuzzInput("", 0, seed, f"{INDEX}: {description}", pick_target(rng, "load"), files, outside)


# --------------------------------------------------------------------------- (c) config.json

EXTRA_CONFIG = {"sliding_window": (1, 2, 0, -1), "hidden_act": ("gelu", "relu", "nope", 5),
                "rope_scaling": ({"type": "linear", "factor": 2.0}, {"rope_type": "yarn"}, "linear", 5),
                "rope_parameters": ({"rope_type": "default", "rope_theta": 0.0}, {"rope_theta": -1}, []),
                "quantization_config": ({"quant_method": "gptq"},), "head_dim": (0, 1, 3, 2**31, -8),
                "num_key_value_heads": (0, 3, 5, 2**31), "torch_dtype": ("int8", "float8", 5),
                "tie_word_embeddings": (True, "yes"), "attention_bias": (True,), "mlp_bias": (True,),
                "decoder_sparse_step": (0, -1, 100), "mlp_only_layers": ([0, 1, 2], [-1], [10**9], "all"),
                "output_router_logits": (True,), "model_type": ("llama", "mixtral", "qwen2_moe", "", None)}


def config_input(rng: random.Random, seeds: Seeds) -> FuzzInput:
    seed = rng.choice(("mixtral", "qwen2_moe", "olmoe", "switch"))
    config = json.loads(_read(seeds, seed, "config.json"))
    op = rng.random()
    if op < 0.5:  # a numeric or boolean field
        numeric = [k for k, v in config.items() if isinstance(v, (int, float))]
        key = rng.choice(numeric)
        config[key] = interesting_value(rng, config[key])
        description = f"{key} = {str(config[key])[:60]}"
    elif op < 0.62:
        key = rng.choice(sorted(config))
        del config[key]
        description = f"{key} deleted"
    elif op < 0.76:
        key = rng.choice(sorted(EXTRA_CONFIG))
        config[key] = rng.choice(EXTRA_CONFIG[key])
        description = f"{key} = {config[key]!r}"
    elif op < 0.86:
        _, description = mutate_json(config, rng)
    elif op < 0.95:
        raw, description = mutate_bytes(dump_json(config), rng)
        return FuzzInput("", 0, seed, f"config.json: {description}", pick_target(rng, "load"), {"config.json": raw})
    else:
        content, description = _special(rng, "config.json")
        return FuzzInput("", 0, seed, description, pick_target(rng, "load"), {"config.json": content})
    return FuzzInput("", 0, seed, f"config.json: {description}", pick_target(rng, "load"),
                     {"config.json": dump_json(config)})


# --------------------------------------------------------------------------- (d) tokenizer files

def _tokenizer_json_paths(tok: dict) -> list[tuple]:
    """Nodes of tokenizer.json worth mutating: not only the vocabulary (most of the file)."""
    paths = json_paths(tok, limit=20000)
    heads = [p for p in paths if len(p) <= 2 or p[0] in ("added_tokens", "normalizer", "pre_tokenizer", "decoder",
                                                          "post_processor")]
    return heads + [p for p in paths if p[:2] in (("model", "vocab"), ("model", "merges"))][:400]


def tokenizer_input(rng: random.Random, seeds: Seeds) -> FuzzInput:
    seed = rng.choice(("mixtral", "qwen2_moe", "olmoe"))
    present = sorted(p.name for p in seeds.hf[seed].iterdir() if p.name.startswith(("tokenizer", "special_tokens")))
    name = rng.choice(present)
    target = "cli-run" if rng.random() < 0.2 else "chat"
    data = _read(seeds, seed, name)
    op = rng.random()
    if op < 0.06:
        content, description = _special(rng, name)
        return FuzzInput("", 0, seed, description, target, {name: content})
    if name == "tokenizer.model" or op < 0.3:  # sentencepiece's protobuf, or malformed JSON
        new, description = mutate_bytes(data, rng, donor=_read(seeds, "mixtral", "tokenizer.json"))
        return FuzzInput("", 0, seed, f"{name}: {description}", target, {name: new})
    value = json.loads(data)
    if op < 0.38:  # huge
        n = rng.choice((10**4, 10**5))  # 1 to 13 MB: a file read whole; /dev/zero is the endless one
        if name == "tokenizer.json":
            value["added_tokens"] = [{"id": 200 + i, "content": f"<t{i}>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True} for i in range(n)]
            description = f"{n} added tokens"
        else:
            key = rng.choice(("bos_token", "eos_token", "chat_template", "unk_token"))
            value[key] = "x" * (n * 10)
            description = f"{key} of {n * 10} characters"
        return FuzzInput("", 0, seed, f"{name}: {description}", target, {name: dump_json(value)})
    if name == "tokenizer_config.json" and op < 0.6:
        key = rng.choice(("bos_token", "eos_token", "add_bos_token", "chat_template", "unk_token",
                          "added_tokens_decoder"))
        value[key] = rng.choice((interesting_value(rng, value.get(key)), {"content": interesting_value(rng)},
                                 [{"name": "default", "template": "{{ messages }}"}], {"__type": "AddedToken"}))
        description = f"{key} = {str(value[key])[:60]}"
    else:
        paths = _tokenizer_json_paths(value) if name == "tokenizer.json" else None
        descriptions = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            value, description = mutate_json(value, rng, paths)
            descriptions.append(description)
            paths = None if name != "tokenizer.json" else _tokenizer_json_paths(value)
        description = "; ".join(descriptions)
    return FuzzInput("", 0, seed, f"{name}: {description}", target, {name: dump_json(value)})
