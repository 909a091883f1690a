"""The token embedding table, left in its file: a token needs one row of it, so an
untied table (32000 x 4096 bf16 is 250 MiB in Mixtral-8x7B) need not take the budget.
Rows are read with pread as tokens come; the pages they leave in the page cache are a
few KiB per token and are dropped after each read."""
from __future__ import annotations

import os

import numpy as np
import torch

from moeedge.formats.checkpoint import Checkpoint
from moeedge.formats.errors import CheckpointError
from moeedge.formats.safetensors_file import TensorInfo, read_header

EMBEDDING = "model.embed_tokens.weight"


class DiskEmbedding:
    """rows(tokens) of a [vocab, hidden] table stored plainly (bf16/fp16/fp32) in a file."""

    def __init__(self, info: TensorInfo):
        self.info = info
        self.shape = info.shape
        self.row_bytes = info.nbytes // info.shape[0]
        self.fd = os.open(info.path, os.O_RDONLY)

    def rows(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ids = tokens.tolist()
        buf = bytearray(self.row_bytes * len(ids))
        for i, t in enumerate(ids):
            if not 0 <= t < self.shape[0]:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{self.shape[0] - 1})")
            offset = self.info.offset + t * self.row_bytes
            got = os.preadv(self.fd, [memoryview(buf)[i * self.row_bytes:(i + 1) * self.row_bytes]], offset)
            if got != self.row_bytes:
                raise CheckpointError(f"{self.info.path}: short read of {self.info.name!r} row {t} at offset "
                                      f"{offset} (file truncated?)")
            os.posix_fadvise(self.fd, offset, self.row_bytes, os.POSIX_FADV_DONTNEED)
        if not ids:
            return torch.empty((0, self.shape[1]), dtype=dtype)
        array = np.frombuffer(buf, dtype=np.uint8)
        return torch.from_numpy(array.copy()).view(self.info.dtype).view(len(ids), self.shape[1]).to(dtype)

    def close(self) -> None:
        os.close(self.fd)


def embedding_on_disk(ckpt: Checkpoint) -> TensorInfo | None:
    """Where the embedding table lies, when it can stay there: a decoder whose output
    projection is its own tensor (untied), stored plainly in a safetensors file."""
    if EMBEDDING not in ckpt.dense_names or "lm_head.weight" not in ckpt.dense_names:
        return None
    for path in ckpt.files:
        if not str(path).endswith(".safetensors"):
            continue
        info = read_header(path).get(EMBEDDING)
        if info is not None:
            plain = info.dtype in (torch.bfloat16, torch.float16, torch.float32) and len(info.shape) == 2
            return info if plain else None
    return None
