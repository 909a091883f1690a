"""A GGUF file as data the fuzzer can mutate field by field, and its writer.

gguf.GGUFWriter only writes consistent files; a hostile one lies: a tensor count the
table does not hold, a string length past the end, a dimension of 2**63, an offset that
overlaps another tensor. GGUFSpec keeps every field as a value to change, and Raw lets a
metadata value's bytes be anything at all. The layout is GGUF v3 as llama.cpp writes it:
header (magic, version, tensor count, metadata count), metadata (key, type, value), the
tensor table (name, n_dims, dims innermost first, ggml type, offset in the data), padding
to general.alignment, the data.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
                  BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


@dataclass
class Raw:
    """A metadata value written as these bytes, whatever its type says."""

    data: bytes


@dataclass
class KV:
    key: str
    vtype: int
    value: object           # a scalar, a str, a list (ARRAY: elements of elem_type), or Raw
    elem_type: int = UINT32  # ARRAY only


@dataclass
class TensorEntry:
    name: str | bytes
    dims: list[int]          # GGUF order: innermost (ne[0]) first
    ggml_type: int
    offset: int              # in the data section, from its aligned start
    n_dims: int | None = None  # None: len(dims); else a count that may lie


@dataclass
class GGUFSpec:
    kvs: list[KV]
    tensors: list[TensorEntry]
    data: bytes
    alignment: int = 32
    version: int = 3
    magic: bytes = b"GGUF"
    n_tensors: int | None = None  # None: len(tensors); else a count that may lie
    n_kvs: int | None = None

    def kv(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key), None)


def _string(text: str | bytes) -> bytes:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _scalar(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _string(value)
    fmt = SCALAR_FORMATS.get(vtype)
    if fmt is None:
        raise ValueError(f"GGUF value type {vtype} is not a scalar")
    if fmt in ("<f", "<d"):
        value = float(value)
        if fmt == "<f" and math.isfinite(value) and abs(value) > 3.4e38:
            value = math.copysign(math.inf, value)  # what a float32 holds of it
        return struct.pack(fmt, value)
    if fmt == "<?":
        return struct.pack("<B", int(bool(value)))
    value = int(value) if not isinstance(value, float) or math.isfinite(value) else 0
    bits = struct.calcsize(fmt) * 8
    return struct.pack(fmt.upper(), value & ((1 << bits) - 1))  # wrapped: any value of the wrong width has bytes


def value_bytes(kv: KV) -> bytes:
    """A metadata value as written after its key and type."""
    if isinstance(kv.value, Raw):
        return kv.value.data
    if kv.vtype == ARRAY:
        items = kv.value if isinstance(kv.value, list) else [kv.value]
        return struct.pack("<IQ", kv.elem_type & 0xFFFFFFFF, len(items)) + b"".join(
            _scalar(kv.elem_type, v) for v in items)
    return _scalar(kv.vtype, kv.value)


def to_bytes(spec: GGUFSpec) -> bytes:
    out = bytearray(spec.magic)
    out += struct.pack("<IQQ", spec.version & 0xFFFFFFFF, _u64(spec.n_tensors, len(spec.tensors)),
                       _u64(spec.n_kvs, len(spec.kvs)))
    for kv in spec.kvs:
        out += _string(kv.key) + struct.pack("<I", kv.vtype & 0xFFFFFFFF) + value_bytes(kv)
    for t in spec.tensors:
        out += _string(t.name) + struct.pack("<I", _u64(t.n_dims, len(t.dims)) & 0xFFFFFFFF)
        out += b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.dims)
        out += struct.pack("<IQ", t.ggml_type & 0xFFFFFFFF, t.offset & (2**64 - 1))
    align = spec.alignment if isinstance(spec.alignment, int) and 0 < spec.alignment < 1 << 20 else 32
    out += b"\0" * (-len(out) % align)
    return bytes(out + spec.data)


def _u64(value: int | None, default: int) -> int:
    return (default if value is None else value) & (2**64 - 1)


@dataclass
class Layout:
    """Where each tensor's bytes go: data appended, offsets aligned."""

    alignment: int = 32
    data: bytearray = field(default_factory=bytearray)

    def add(self, payload: bytes) -> int:
        self.data += b"\0" * (-len(self.data) % self.alignment)
        offset = len(self.data)
        self.data += payload
        return offset
