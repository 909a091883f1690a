"""Values read from a checkpoint's description (config.json, GGUF metadata), checked
before anything is sized by them: each of the right type and within limits that still
admit real models, so that a hostile count is refused, not allocated."""
from __future__ import annotations

import math

import torch

from moeedge.formats.errors import CheckpointError, shown

# Limits that admit every released MoE model with room to spare.
MAX_LAYERS = 1024
MAX_EXPERTS = 256
MAX_VOCAB = 1 << 18        # a 256k vocabulary
MAX_CONTEXT = 1 << 20      # a 1M-token context
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_WIDTH = 1 << 18        # hidden and FFN widths (Mixtral-8x22B: 6144 and 16384)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED = object()


class Fields:
    """Typed reads of one description. where: how errors start ("x/config.json:",
    "x.gguf: GGUF metadata"); lacks: how they say that a field is absent."""

    def __init__(self, raw: dict, where: str, lacks: str):
        self.raw, self.where, self.lacks = raw, where, lacks

    def require(self, *keys: str) -> None:
        missing = [k for k in keys if self.raw.get(k) is None]
        if missing:
            raise CheckpointError(f"{self.lacks} {', '.join(missing)}")

    def bad(self, key: str, value, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where} {key} = {shown(value)}: {why}")

    def get(self, key: str, default=REQUIRED):
        value = self.raw.get(key)
        if value is None:
            if default is REQUIRED:
                raise CheckpointError(f"{self.lacks} {key}")
            return default
        return value

    def count(self, key: str, limit: int, default=REQUIRED, minimum: int = 1) -> int:
        """An integer from minimum to limit (bool is not one)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= limit:
            raise self.bad(key, value, f"must be an integer from {minimum} to {limit}")
        return value

    def number(self, key: str, default=REQUIRED) -> float:
        """A finite number above zero (epsilons, RoPE bases)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise self.bad(key, value, "must be a finite number above zero")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.bad(key, value, "must be true or false")
        return value

    def token_id(self, key: str, vocab: int, default=None) -> int | None:
        value = self.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab):
            raise self.bad(key, value, f"must be a token id, 0 to {vocab - 1}")
        return value

    def token_ids(self, key: str, vocab: int, default=None) -> list[int]:
        """One token id or a list of them (eos_token_id)."""
        value = self.get(key, default)
        if value is None:
            return []
        ids = value if isinstance(value, list) else [value]
        if len(ids) > vocab or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise self.bad(key, value, f"must be a token id or a list of them, each 0 to {vocab - 1}")
        return ids

    def dtype(self) -> torch.dtype:
        """The weights' dtype as config.json names it (dtype, or torch_dtype before transformers 5)."""
        name = self.raw.get("dtype") or self.raw.get("torch_dtype") or "bfloat16"
        return DTYPES.get(str(name).replace("torch.", ""), torch.bfloat16)
