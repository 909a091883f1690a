"""One hivemind module backend per MoE layer: forward(hidden [N, H] fp32, expert [N] int64)
-> [N, H], each row expert[row] applied to hidden[row], unscaled, by the same batch-invariant
kernels a local expert runs (moeedge.models.decoder_ffn.expert_rows): a remote expert's row
has the bits it would have had locally, however the peer batched it with other callers'."""
from __future__ import annotations

import torch

from moeedge.models.decoder_ffn import expert_rows
from moeedge.runtime.experts import ExpertAccess


class LayerExperts(torch.nn.Module):
    """The experts of one MoE layer that this peer holds. Bound to the expert cache only after
    hivemind's processes have forked (moeedge.peers.server): until then it refuses work."""

    def __init__(self, moe_layer: int, hidden: int):
        super().__init__()
        self.moe_layer, self.hidden = moe_layer, hidden
        self.experts: ExpertAccess | None = None
        self.held: frozenset[int] = frozenset()

    def bind(self, experts: ExpertAccess, held: list[int]) -> None:
        self.experts, self.held = experts, frozenset(held)

    def forward(self, hidden: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        if self.experts is None:
            raise RuntimeError("this peer is still loading its experts")
        if hidden.dtype != torch.float32 or hidden.dim() != 2 or hidden.shape[1] != self.hidden:
            raise ValueError(f"hidden states must be float32 [rows, {self.hidden}], got {hidden.dtype} "
                             f"{list(hidden.shape)}")
        picks = expert.tolist()
        out = torch.empty_like(hidden)
        for e in sorted(set(picks)):
            if e not in self.held:
                raise ValueError(f"expert {e} of MoE layer {self.moe_layer} is not held by this peer")
            rows = torch.tensor([r for r, p in enumerate(picks) if p == e])
            out[rows] = expert_rows(self.experts, self.moe_layer, e, hidden[rows].contiguous())
        return out


def layer_backend(name: str, module: LayerExperts, max_rows: int):
    """hivemind's ModuleBackend for a layer, forward only: no backward pool is started and
    backward raises (the connection handler refuses it before that)."""
    from hivemind.moe.server.module_backend import ModuleBackend
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    class ForwardOnly(ModuleBackend):
        def backward(self, *inputs):
            raise PermissionError("backward is disabled on moeedge peers")

        def get_pools(self):
            return (self.forward_pool,)

    return ForwardOnly(name, module, args_schema=(BatchTensorDescriptor(module.hidden, dtype=torch.float32),
                                                  BatchTensorDescriptor(dtype=torch.int64)),
                       outputs_schema=BatchTensorDescriptor(module.hidden, dtype=torch.float32),
                       max_batch_size=max_rows)
