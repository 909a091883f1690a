"""Expert weights as torch views over the native cache's pinned buffers."""
from __future__ import annotations

import torch

from moeedge._core import ExpertBuffer, ExpertCache, ExpertFfn
from moeedge.expert_tensor import expert_view
from moeedge.formats.checkpoint import ExpertPart
from moeedge.keys import expert_key, split_key
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.kernels import native_format


class ExpertWeights:
    """The matrices of one expert, by role; they pin the cached bytes while referenced."""

    def __init__(self, cache: ExpertCache, key: int, parts: list[ExpertPart], dtype: torch.dtype | None):
        buf = cache.get(key)
        self.weights: dict[str, torch.Tensor] = {}
        for part in parts:
            if part.quant is not None:
                raw = expert_view(buf, torch.uint8, offset=part.offset, count=part.nbytes)
                q = QuantTensor(raw, part.quant, part.shape)
                # dtype None: multiplied as stored by the native kernel; else dequantized now.
                self.weights[part.role] = q if dtype is None else q.dequantize(dtype)
                continue
            w = expert_view(buf, part.dtype, offset=part.offset, count=part.nbytes // part.dtype.itemsize)
            w = w.view(part.shape)
            # dtype None: multiplied as stored (moeedge.kernels); else a copy where it differs.
            self.weights[part.role] = w if dtype is None or part.dtype == dtype else w.to(dtype)

    def __getitem__(self, role: str) -> torch.Tensor:
        return self.weights[role]


def native_ffn(parts: list[ExpertPart]) -> ExpertFfn | None:
    """The expert's gate, up and down as the native FFN takes them, where all three are in a
    format its kernels multiply as stored (bf16, GGUF blocks, moeedge's int8/int4)."""
    by_role = {part.role: part for part in parts}
    if set(by_role) != {"gate", "up", "down"}:
        return None
    specs = []
    for role in ("gate", "up", "down"):
        part = by_role[role]
        found = native_format(part.quant, part.dtype)
        if found is None:
            return None
        specs.append((found[0], part.offset, *part.shape, found[1]))
    return ExpertFfn(*specs)


def current_keys(keys, layer_variants: dict[int, int]) -> list[int]:
    """Of a store's keys, those of each layer's representation now (an adaptive model's
    store holds every variant; the rest are not read)."""
    return [k for k in keys if split_key(k)[2] == layer_variants.get(split_key(k)[0], 0)]


class ExpertAccess:
    """Get, prefetch and ask residency of experts by (MoE layer, expert)."""

    def __init__(self, cache: ExpertCache, parts: dict[int, list[ExpertPart]], dtype: torch.dtype | None,
                 expert_layouts: dict[int, list[ExpertPart]] | None = None,
                 layer_variants: dict[int, int] | None = None):
        self.cache = cache
        # MoE layer -> its representation (moeedge.ladder); changed in place by a live switch
        self.layer_variants = layer_variants if layer_variants is not None else {}
        self.parts = parts  # layer -> the layout of its experts
        self.expert_layouts = expert_layouts or {}  # cache key -> parts, where an expert differs
        self.dtype = dtype
        self.slot = max(cache.store.slot_bytes(k) for k in cache.store.keys())
        self._ffns: dict[int, ExpertFfn | None] = {}  # id(parts) -> its native FFN
        self._every: tuple | None = None  # (layer_variants, their keys, their slot bytes)

    def key(self, layer: int, expert: int) -> int:
        """The expert's cache key in the representation its layer is read in."""
        return expert_key(layer, expert, self.layer_variants.get(layer, 0))

    def ffn(self, layer: int, expert: int) -> ExpertFfn | None:
        """The native FFN for this expert's layout (None: the torch path), when weights are
        multiplied as stored (dtype None)."""
        if self.dtype is not None:
            return None
        parts = self.parts[layer]
        if self.expert_layouts:
            parts = self.expert_layouts.get(self.key(layer, expert), parts)
        if id(parts) not in self._ffns:
            self._ffns[id(parts)] = native_ffn(parts)
        return self._ffns[id(parts)]

    def every_key(self) -> list[int]:
        """Every expert's key in the representation its layer is read in now (worked out
        again after a live switch changes layer_variants)."""
        state = tuple(sorted(self.layer_variants.items()))
        if self._every is None or self._every[0] != state:
            store = self.cache.store
            keys = current_keys(store.keys(), self.layer_variants)
            self._every = (state, keys, sum(map(store.slot_bytes, keys)))
        return self._every[1]

    def current_bytes(self) -> int:
        """The slot bytes of every expert in the representation its layer is read in now."""
        self.every_key()
        return self._every[2]

    def holds_all(self) -> bool:
        """The cache's budget (which can change at run time) holds every expert read now."""
        return self.cache.budget_bytes >= self.current_bytes()

    def buffer(self, layer: int, expert: int) -> ExpertBuffer:
        """The expert's bytes, pinned while referenced."""
        return self.cache.get(self.key(layer, expert))

    @property
    def capacity(self) -> int:
        """Experts the cache holds at once (its budget can change at run time)."""
        return max(1, self.cache.budget_bytes // self.slot)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        parts = self.parts[layer]
        if self.expert_layouts:
            parts = self.expert_layouts.get(self.key(layer, expert), parts)
        return ExpertWeights(self.cache, self.key(layer, expert), parts, self.dtype)

    def resident(self, layer: int, expert: int) -> bool:
        return self.cache.contains(self.key(layer, expert))

    def prefetch(self, layer: int, experts: list[int], priority: int = 0) -> None:
        # Never ask for more than fits beside the expert being computed: the extra
        # reads would evict each other before use.
        keys = [self.key(layer, e) for e in experts[: max(0, self.capacity - 1)]]
        if keys:
            self.cache.prefetch(keys, priority)

    def cancel(self, layer: int, experts: list[int]) -> None:
        """Drop these experts' prefetches if queued, and stop them if being read
        (unless the model already waits for them)."""
        self.cache.cancel_prefetches([self.key(layer, e) for e in experts])
