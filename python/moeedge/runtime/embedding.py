"""The token embedding table, left in its file: a token needs one row of it, so an
untied table (32000 x 4096 bf16 is 250 MiB in Mixtral-8x7B; 34 MiB in mixtral-medium's
Q8_0 GGUF) need not take the budget. Rows are read with pread as tokens come; the pages
they leave in the page cache are a few KiB per token and are dropped after each read."""
from __future__ import annotations

import os

import numpy as np
import torch

from moeedge.formats.checkpoint import Checkpoint, StoredTensor
from moeedge.formats.errors import CheckpointError
from moeedge.formats.gguf_quants import dequantize

EMBEDDING = "model.embed_tokens.weight"
PLAIN = (torch.bfloat16, torch.float16, torch.float32)


class DiskEmbedding:
    """rows(tokens) of a [vocab, hidden] table stored plainly or in GGUF blocks in a file."""

    def __init__(self, table: StoredTensor):
        self.info, self.quant = table.info, table.quant
        self.shape = self.info.shape
        self.row_bytes = self.info.nbytes // self.shape[0]
        self.fd = os.open(self.info.path, os.O_RDONLY)

    def rows(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.fd < 0:
            raise RuntimeError(f"{self.info.path}: the embedding table's file is closed")
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
        raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
        if self.quant is not None:
            return dequantize(raw, self.quant, (len(ids), self.shape[1]), dtype)
        return raw.view(self.info.dtype).view(len(ids), self.shape[1]).to(dtype)

    def close(self) -> None:
        """Idempotent: the descriptor number is forgotten, so a second close cannot close
        another file that reused it, and a read after close raises."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def embedding_on_disk(ckpt: Checkpoint) -> StoredTensor | None:
    """Where the embedding table lies, when it can stay there: a decoder whose output
    projection is its own tensor (untied), the table stored plainly or in GGUF blocks."""
    if EMBEDDING not in ckpt.dense_names or "lm_head.weight" not in ckpt.dense_names or ckpt.locate is None:
        return None
    table = ckpt.locate(EMBEDDING)
    if len(table.info.shape) != 2 or (table.quant is None and table.info.dtype not in PLAIN):
        return None
    return table
