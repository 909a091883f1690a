"""GGUF files as llama.cpp writes them: the metadata and the tensor table, parsed with
gguf's GGUFReader and validated here before anything is trusted (each tensor's type,
dimensions, alignment and extent in the file). moeedge.formats.gguf_checkpoint makes a
model of them."""
from __future__ import annotations

import math
import os
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from moeedge.formats.errors import CheckpointError, brief, shown, shown_name
from moeedge.formats.trust import open_regular

GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version, tensor count, metadata count
MAX_DIMS = 4       # GGML_MAX_DIMS
# What a real file holds with room to spare (Mixtral-8x22B: 563 tensors, ~40 metadata
# keys, arrays of up to a vocabulary's merges). Parsing builds Python objects for each, so
# a hostile count is refused before the parse, not allocated.
MAX_TENSORS = 1 << 16
MAX_METADATA = 1 << 16
MAX_ARRAY = 1 << 22

# ggml type id -> (name, dtype of its bytes, quant, weights per block, bytes per block)
TYPES = {
    0: ("F32", torch.float32, None, 1, 4),
    1: ("F16", torch.float16, None, 1, 2),
    30: ("BF16", torch.bfloat16, None, 1, 2),
    8: ("Q8_0", torch.uint8, "q8_0", 32, 34),
    2: ("Q4_0", torch.uint8, "q4_0", 32, 18),
    12: ("Q4_K", torch.uint8, "q4_k", 256, 144),
    13: ("Q5_K", torch.uint8, "q5_k", 256, 176),  # Q4_K_M's attn_output for Mixtral
    14: ("Q6_K", torch.uint8, "q6_k", 256, 210),  # Q4_K_M files mix Q4_K and Q6_K (and keep some F32)
}
SUPPORTED_TYPES = ", ".join(t[0] for t in TYPES.values())


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: GGUF lists ne[0], the innermost dimension, first
    offset: int             # absolute offset in the file
    nbytes: int
    file: int = 0           # which of GGUFFile.paths holds it (a split model's part)

    @property
    def type_name(self) -> str:
        return TYPES[self.ggml_type][0]


@dataclass
class GGUFFile:
    path: str
    metadata: dict
    tensors: dict[str, GGUFTensor]
    paths: list[str] = field(default_factory=list)  # every part's file; [path] unless split

    def __post_init__(self):
        self.paths = self.paths or [self.path]


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    _, _, _, block, block_bytes = TYPES[ggml_type]
    return math.prod(shape) // block * block_bytes



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
            if n > MAX_ARRAY:
                raise ValueError(f"an array at offset {orig_offs} claims {n} elements, more than the "
                                 f"{MAX_ARRAY} moeedge reads")
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


def _check_counts(path: str, head: bytes) -> None:
    order = "<" if struct.unpack_from("<I", head, 4)[0] <= 0xFFFF else ">"  # a version, or one byte-swapped
    n_tensors, n_metadata = struct.unpack_from(order + "QQ", head, 8)
    for what, n, limit in (("tensor count", n_tensors, MAX_TENSORS), ("metadata count", n_metadata, MAX_METADATA)):
        if n > limit:
            raise CheckpointError(f"{path}: GGUF header {what} = {n}, more than the {limit} moeedge reads")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's metadata and tensor table; CheckpointError names the file and tensor."""
    path = str(path)
    fd = open_regular(path)  # a FIFO or a device would block or never end
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
    if len(head) < HEADER_BYTES or head[:4] != GGUF_MAGIC:  # its first bytes are not shown: it may be any file
        raise CheckpointError(f"{path}: not a GGUF file ({size} bytes, not starting with {GGUF_MAGIC!r})")
    _check_counts(path, head)
    try:
        reader = _checked_reader_class()(path)
        metadata = {name: _field_value(field) for name, field in reader.fields.items() if field.types}
        fields = [(bytes(p[1]), int(p[2][0]), [int(d) for d in p[3]], int(p[4][0]), int(p[5][0]))
                  for p in (f.parts for f in reader.tensor_fields)]
        alignment, data_offset = int(reader.alignment), int(reader.data_offset)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt GGUF header ({brief(e)})") from None
    finally:
        reader = None  # drop the file mapping: tensors are read with pread
    tensors: dict[str, GGUFTensor] = {}
    for raw_name, n_dims, ne, ggml_type, rel in fields:
        t = _tensor(path, raw_name, n_dims, ne, ggml_type, rel, alignment, data_offset, size)
        if t.name in tensors:
            raise CheckpointError(f"{path}: tensor {shown_name(t.name)} appears twice")
        tensors[t.name] = t
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {shown_name(name_a)} and {shown_name(name_b)} overlap")
    return GGUFFile(path, metadata, tensors)


def _tensor(path, raw_name, n_dims, ne, ggml_type, rel, alignment, data_offset, size) -> GGUFTensor:
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: tensor name {raw_name[:64]!r} is not UTF-8") from None
    if not 1 <= n_dims <= MAX_DIMS or any(d < 1 for d in ne) or math.prod(ne) >= 1 << 62:
        raise CheckpointError(f"{path}: tensor {shown_name(name)} has invalid dimensions {shown(ne)}")
    if ggml_type not in TYPES:
        from gguf import GGMLQuantizationType  # noqa: PLC0415

        try:
            found = GGMLQuantizationType(ggml_type).name
        except ValueError:
            found = f"ggml type id {ggml_type}"
        raise CheckpointError(f"{path}: tensor {shown_name(name)} is {found}, which moeedge does not read; "
                              f"supported: {SUPPORTED_TYPES} (requantize, e.g. llama-quantize ... Q4_K_M)")
    type_name, _, _, block, _ = TYPES[ggml_type]
    if ne[0] % block:
        raise CheckpointError(f"{path}: tensor {shown_name(name)} is {type_name} with rows of {ne[0]} weights, "
                              f"not whole {block}-weight blocks")
    shape = tuple(reversed(ne))
    nbytes = tensor_nbytes(ggml_type, shape)
    if rel % alignment:
        raise CheckpointError(f"{path}: tensor {shown_name(name)} at data offset {rel} is not aligned to "
                              f"{alignment} bytes")
    offset = data_offset + rel
    if offset + nbytes > size:
        raise CheckpointError(f"{path}: tensor {shown_name(name)} ({type_name}{list(shape)}, {nbytes} bytes at "
                              f"offset {offset}) ends past the end of the file ({size} bytes; truncated?)")
    return GGUFTensor(name, ggml_type, shape, offset, nbytes)


