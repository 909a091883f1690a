"""moeedge_variant.json, written by `moeedge aggregate` (moeedge.aggregate.variant): an
aggregated variant's router-to-stored-expert table, read the same way for decoders and
Switch."""
from __future__ import annotations

from moeedge.formats.errors import CheckpointError, shown
from moeedge.formats.hf_directory import HFDirectory

VARIANT_FILE = "moeedge_variant.json"


def read_variant_map(directory: HFDirectory, n_moe_layers: int, n_experts: int) -> list[list[int]] | None:
    """The table per MoE layer (None: not a variant). Each entry is a stored expert
    0..n-1 or -1 (dropped); every stored expert is some router output's."""
    path = directory.find(VARIANT_FILE)
    if path is None:
        return None
    raw = directory.read_json(path, "a valid variant description")
    table = raw.get("expert_map") if isinstance(raw, dict) else None
    if table is None:
        raise CheckpointError(f"{path}: not a valid variant description (no expert_map)")
    if not isinstance(table, list) or len(table) != n_moe_layers:
        raise CheckpointError(f"{path}: expert_map must list {n_moe_layers} MoE layers")
    for i, row in enumerate(table):
        if not (isinstance(row, list) and len(row) == n_experts
                and all(isinstance(e, int) and not isinstance(e, bool) for e in row)):
            raise CheckpointError(f"{path}: expert_map[{i}] must be {n_experts} integers (the router's outputs)")
        stored = {e for e in row if e >= 0}
        if min(row) < -1 or not stored or stored != set(range(max(stored) + 1)):
            raise CheckpointError(f"{path}: expert_map[{i}] must map onto stored experts 0..n-1, each used, "
                                  f"or -1 (dropped); got {shown(row)}")
    return table
