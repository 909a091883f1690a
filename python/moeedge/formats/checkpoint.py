"""What the runtime needs from any checkpoint format: the model's config, dense tensors
read on request, and each expert's byte ranges plus how its packed bytes split into
weight matrices."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from moeedge.formats.safetensors_file import TensorInfo
from moeedge.keys import expert_key


@dataclass(frozen=True)
class ExpertPart:
    """One weight matrix inside an expert's packed bytes."""

    role: str                 # "gate", "up", "down" (Switch: "wi", "wo")
    dtype: torch.dtype
    shape: tuple[int, ...]    # [out, in], as F.linear takes it
    offset: int               # byte offset in the packed expert
    nbytes: int
    quant: str | None = None  # None: plain dtype; "q8_0", "int4_g128", ...: multiplied as stored


@dataclass(frozen=True)
class StoredTensor:
    """Where a dense tensor's bytes lie in its file, as stored: what reading rows of it in
    place needs (moeedge.runtime.embedding)."""

    info: TensorInfo          # info.shape: the values' shape, [rows, cols]
    quant: str | None = None  # GGUF blocks, each row whole blocks; None: plain info.dtype


@dataclass
class Checkpoint:
    source: str
    config: object                                   # DecoderConfig or SwitchConfig
    files: list[str]
    # ExpertKey.packed -> [(file_index, offset, length)], segments in part order
    expert_ranges: dict[int, list[tuple[int, int, int]]]
    # MoE layer index -> the layout shared by all its experts
    expert_parts: dict[int, list[ExpertPart]]
    dense_names: list[str]
    read_dense: Callable[[str], torch.Tensor]
    dense_numel: int                                 # elements of all dense tensors
    dense_nbytes: int                                # their bytes as read_dense returns them
    tokenizer_files: dict[str, str] = field(default_factory=dict)
    # Formats that embed their vocabulary (GGUF) build the tokenizer themselves.
    tokenizer_factory: Callable[[], object] | None = None
    # Experts whose layout differs from their layer's (ExpertKey.packed -> parts): per-expert
    # bit-widths (moeedge.formats.quant_checkpoint).
    expert_layouts: dict[int, list[ExpertPart]] = field(default_factory=dict)
    # Where a dense tensor lies as stored (None: not known, the tensor is only read whole).
    locate: Callable[[str], StoredTensor] | None = None
    # MoE layer -> the representation its experts are read in (moeedge.ladder; absent: as
    # stored): their keys are VariantKeys, so a cache never mixes two representations.
    layer_variants: dict[int, int] = field(default_factory=dict)
    # The sampling the checkpoint recommends (SamplingParams keyword arguments, checked) and
    # the file that said so (moeedge.formats.generation_config); empty: it says nothing.
    sampling: dict = field(default_factory=dict)
    sampling_from: str | None = None

    @property
    def expert_nbytes(self) -> int:
        return sum(length for segs in self.expert_ranges.values() for _, _, length in segs)

    def expert_key(self, layer: int, expert: int) -> int:
        return expert_key(layer, expert, self.layer_variants.get(layer, 0))

    def parts_of(self, layer: int, expert: int) -> list[ExpertPart]:
        return self.expert_layouts.get(self.expert_key(layer, expert), self.expert_parts[layer])

    def layer_expert_nbytes(self, layer: int) -> int:
        return sum(p.nbytes for p in self.expert_parts[layer])
