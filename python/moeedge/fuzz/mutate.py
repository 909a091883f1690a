"""Mutations, every one drawn from a random.Random the caller seeds: byte-level ones
(bit flips, interesting bytes and integers, truncation, deletion, duplication, splices)
and structure-aware ones over JSON values (a node replaced by an interesting value of any
type, a key deleted or added, a list grown, a value nested deep). Each returns the
mutated value and a short description of what it did, for the report."""
from __future__ import annotations

import json
import random
import struct

INTERESTING_INTS = (0, -1, 1, 2, 3, 7, 8, 16, 255, 256, 1023, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
                    2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**9, 10**12, 10**18, -2**31,
                    -2**63, -(10**9))
INTERESTING_FLOATS = (0.0, -0.0, 0.5, -1.5, 1e-30, 1e9, 1e30, 1e308, float("inf"), float("-inf"), float("nan"))
INTERESTING_STRINGS = ("", "a", "float32", "bfloat16", "F16", "I8", "torch.float32", "../../../etc/passwd",
                       "/etc/passwd", "/dev/zero", "\u0000", "\u202e", "x" * 4096, "%s%n{0}",
                       "{{ 7*7 }}", "NaN", "1e9", "-1")
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A)


def interesting_value(rng: random.Random, like=None):
    """A value likely to break a parser or a size computation; of like's type more often than not."""
    pick = rng.random()
    if isinstance(like, bool) and pick < 0.5:
        return not like
    if isinstance(like, int) and not isinstance(like, bool) and pick < 0.6:
        return rng.choice(INTERESTING_INTS + (like + 1, like - 1, like * 2, like * 1000))
    if isinstance(like, float) and pick < 0.6:
        return rng.choice(INTERESTING_FLOATS + (like * 1e6, -like))
    if isinstance(like, str) and pick < 0.5:
        return rng.choice(INTERESTING_STRINGS + (like * 2, like[: len(like) // 2], like.upper()))
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(INTERESTING_INTS)
    if kind == 1:
        return rng.choice(INTERESTING_FLOATS)
    if kind == 2:
        return rng.choice(INTERESTING_STRINGS)
    if kind == 3:
        return rng.choice((None, True, False))
    if kind == 4:
        return rng.choice(([], [0], [1, 2], [-1], [2**63], ["a"], [None], [[1]]))
    if kind == 5:
        return rng.choice(({}, {"a": 1}, {"type": "default"}, {"rope_type": "linear", "factor": 2.0}))
    if kind == 6:
        return [rng.choice(INTERESTING_INTS)] * rng.choice((3, 100, 10000))
    return rng.choice(INTERESTING_INTS) if like is None else like


# --------------------------------------------------------------------------- JSON

class Nested:
    """A value inside `depth` lists: written by dump_json, which json.dumps cannot do past
    Python's recursion limit."""

    def __init__(self, value, depth: int):
        self.value, self.depth = value, depth


def dump_json(value) -> bytes:
    """value as JSON (NaN and Infinity as Python writes them), Nested nodes included."""
    nested: list[Nested] = []

    def placeholder(node):
        nested.append(node)
        return f"\0nested{len(nested) - 1}\0"

    def swap(node):
        if isinstance(node, Nested):
            return placeholder(node)
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    text = json.dumps(swap(value), ensure_ascii=False)
    for i, node in enumerate(nested):
        inner = dump_json(node.value).decode("utf-8", "surrogatepass")
        text = text.replace(json.dumps(f"\0nested{i}\0"), "[" * node.depth + inner + "]" * node.depth)
    return text.encode("utf-8", "surrogatepass")


def json_paths(value, path=(), limit: int = 5000) -> list[tuple]:
    """Paths (tuples of keys and indices) to every node, the root included; at most limit of them."""
    out = [path]
    stack = [(value, path)]
    while stack and len(out) < limit:
        node, here = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            out.append(here + (key,))
            stack.append((child, here + (key,)))
    return out


def get_path(value, path):
    for key in path:
        value = value[key]
    return value


def set_path(value, path, new):
    """value with the node at path replaced (path () replaces the root)."""
    if not path:
        return new
    get_path(value, path[:-1])[path[-1]] = new
    return value


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} chars)"


def mutate_json(value, rng: random.Random, paths: list[tuple] | None = None) -> tuple[object, str]:
    """One structure-aware mutation of a parsed JSON value (mutated in place where it can
    be; use the returned value). paths: the nodes to choose from (default: all)."""
    paths = paths or json_paths(value)
    path = rng.choice(paths)
    node = get_path(value, path)
    where = "/".join(map(str, path)) or "(root)"
    op = rng.randrange(10)
    if op <= 4 or not path:
        new = interesting_value(rng, node)
        return set_path(value, path, new), f"{where} = {_show(new)}"
    parent = get_path(value, path[:-1])
    if op == 5:  # delete the node
        del parent[path[-1]]
        return value, f"deleted {where}"
    if op == 6 and isinstance(parent, dict):  # an extra key beside it
        key = rng.choice(("extra", "__class__", "", "rope_scaling", "quantization_config", "sliding_window",
                          "hidden_act", "weight_map", "model_type", "tie_word_embeddings"))
        new = interesting_value(rng)
        parent[key] = new
        return value, f"added {'/'.join(map(str, path[:-1] + (key,)))} = {_show(new)}"
    if op == 7:  # the node's type changed to a container of it
        new = rng.choice(([node], {"value": node}, str(node)))
        return set_path(value, path, new), f"{where} wrapped as {type(new).__name__}"
    if op == 8 and isinstance(node, (list, str)) and node:  # grown
        times = rng.choice((2, 10, 1000))
        new = node * times
        return set_path(value, path, new), f"{where} repeated {times} times"
    depth = rng.choice((50, 5000, 100000))  # nested deep: a recursive parser's limit
    return set_path(value, path, Nested(node, depth)), f"{where} nested {depth} lists deep"


# --------------------------------------------------------------------------- bytes

def mutate_bytes(data: bytes, rng: random.Random, donor: bytes = b"", region: tuple[int, int] | None = None
                 ) -> tuple[bytes, str]:
    """One byte-level mutation of data, within region (start, end) if given."""
    start, end = region or (0, len(data))
    if end <= start:
        return data + bytes([rng.choice(INTERESTING_BYTES)]), "appended a byte"
    buf = bytearray(data)
    at = rng.randrange(start, end)
    op = rng.randrange(8)
    if op == 0:
        flips = rng.choice((1, 2, 8))
        for _ in range(flips):
            i = rng.randrange(start, end)
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{flips} bit flip(s) in bytes {start}..{end}"
    if op == 1:
        buf[at] = rng.choice(INTERESTING_BYTES)
        return bytes(buf), f"byte {at} = {buf[at]:#04x}"
    if op == 2 and at + 8 <= len(buf):
        width = rng.choice((4, 8))
        value = rng.choice([v for v in INTERESTING_INTS if -(2 ** (8 * width - 1)) <= v < 2 ** (8 * width)])
        fmt = {4: "<i" if value < 0 else "<I", 8: "<q" if value < 0 else "<Q"}[width]
        buf[at:at + width] = struct.pack(fmt, value)
        return bytes(buf), f"{width}-byte integer at {at} = {value}"
    if op == 3:
        return bytes(buf[:at]), f"truncated to {at} bytes (of {len(data)})"
    if op == 4:
        n = rng.randint(1, max(1, min(256, end - at)))
        del buf[at:at + n]
        return bytes(buf), f"deleted {n} bytes at {at}"
    if op == 5:
        n = rng.randint(1, max(1, min(256, end - at)))
        buf[at:at] = buf[at:at + n] * rng.choice((1, 2, 16))
        return bytes(buf), f"duplicated {n} bytes at {at}"
    if op == 6 and donor:
        d = rng.randrange(len(donor))
        n = rng.randint(1, min(512, len(donor) - d))
        buf[at:at + n] = donor[d:d + n]
        return bytes(buf), f"spliced {n} bytes of another file at {at}"
    buf[at:at] = bytes(rng.choice(INTERESTING_BYTES) for _ in range(rng.choice((1, 4, 64))))
    return bytes(buf), f"inserted bytes at {at}"
