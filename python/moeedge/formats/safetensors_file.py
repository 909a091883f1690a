"""Safetensors files read where they lie: headers parsed and validated by us, tensor
bytes located by (file, offset, length) and read with pread, never mmapped (a file
truncated under an mmap kills the process with SIGBUS, and mapped pages grow the
page cache behind the memory budget)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeedge.formats.errors import CheckpointError, brief, shown, shown_name
from moeedge.formats.trust import open_regular

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie."""

    name: str
    path: str
    offset: int  # absolute offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate one .safetensors header; CheckpointError names the file and tensor."""
    path = str(path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        header_len = int.from_bytes(head, "little")
        # The length itself is not shown: of a file that is not safetensors, it is 8 of its bytes.
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors header length (over the "
                                  f"{MAX_HEADER_BYTES >> 20} MiB limit)")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: corrupt safetensors header length (past the end of the file, "
                                  f"{size} bytes)")
        raw = os.pread(fd, header_len, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON (not UTF-8 at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({brief(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return _validate(path, header, data_start=8 + header_len, file_size=size)


def _validate(path: str, header: dict, data_start: int, file_size: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{path}: tensor {shown(name)} lacks dtype, shape or data_offsets")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {shown(name)} has dtype {shown(entry['dtype'])}; "
                                  f"supported: {', '.join(DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {shown(name)} has an invalid shape {shown(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {shown(name)} has invalid data_offsets {shown(offsets)}")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {shown(name)} {entry['dtype']}{shown(shape)} needs {expected} bytes "
                                  f"but data_offsets {offsets} span {end - begin}")
        if data_start + end > file_size:
            raise CheckpointError(f"{path}: tensor {shown(name)} ends at offset {data_start + end}, "
                                  f"past the end of the file ({file_size} bytes; truncated?)")
        tensors[name] = TensorInfo(name, path, data_start + begin, end - begin, dtype, tuple(shape))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {shown_name(name_a)} and {shown_name(name_b)} overlap")
    return tensors


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """Read one tensor with pread into fresh memory, then drop its pages from the page cache."""
    own = fd is None
    if own:
        fd = open_regular(info.path)
    try:
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n == 0:
                raise CheckpointError(f"{info.path}: short read of tensor {shown_name(info.name)} at offset "
                                      f"{info.offset + done} (file truncated?)")
            done += n
        os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        if own:
            os.close(fd)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
