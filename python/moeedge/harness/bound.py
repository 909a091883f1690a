"""The physical limit of one decode run on this machine: no engine decodes faster than
the time to stream the weights a token touches through the CPU (matrix-vector
bandwidth), nor faster than reading the experts that even Belady's offline-optimal cache
of the same memory would miss (disk bandwidth). Belady's misses come from the routing
the run actually took, not from the engine's own reads, which would reward waste."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Bound:
    tok_s: float
    compute_s_per_token: float
    miss_bytes: int          # what Belady's cache of capacity_experts reads over the decode steps
    capacity_experts: int
    decode_tokens: int
    run_miss_bytes: int = 0  # what it reads over the whole run from an empty cache, the prompt's tokens too

    def as_dict(self) -> dict:
        return {"bound_tok_s": self.tok_s, "bound_compute_s_per_token": self.compute_s_per_token,
                "bound_miss_bytes": self.miss_bytes, "bound_capacity_experts": self.capacity_experts}


def expert_slot_bytes(facts: dict) -> int:
    return facts["expert_bytes"] // (facts["moe_layers"] * facts["experts"])


def touched_bytes_per_token(facts: dict) -> int:
    """Weights one decode token streams: the dense ones but the embedding table (one row is
    read), and top-k experts in every MoE layer."""
    embedding = facts["vocab"] * facts["hidden"] * facts.get("dense_itemsize", 2)
    return facts["dense_bytes"] - embedding + facts["top_k"] * facts["moe_layers"] * expert_slot_bytes(facts)


def capacity_experts(facts: dict, limit_bytes: int | None) -> int:
    """Experts that fit beside the fixed cost, dense weights and KV cache; all of them when unlimited."""
    n = facts["moe_layers"] * facts["experts"]
    if limit_bytes is None:
        return n
    free = limit_bytes - facts["fixed_bytes"] - facts["dense_bytes"] - facts["kv_cache_bytes"]
    return int(min(n, max(0, free // expert_slot_bytes(facts))))


def physical_bound(facts: dict, routing: np.ndarray, prompt_tokens: int, limit_bytes: int | None,
                   disk_bytes_per_s: float, matvec_bytes_per_s: float) -> Bound | None:
    """routing int [tokens, moe_layers, k]: the prompt's tokens, then one per decode step
    (the steps timed). None where the limit cannot hold one layer's experts beside the rest."""
    # lazy: the simulator loads numba, which the harness needs only when it computes a bound
    from moeedge.sim import from_experts
    from moeedge.sim.policies import simulate

    routing = np.asarray(routing, dtype=np.int64)
    steps = routing.shape[0] - prompt_tokens
    if steps <= 0:
        raise ValueError(f"routing has {routing.shape[0]} tokens, no decode steps after {prompt_tokens} prompt tokens")
    capacity = capacity_experts(facts, limit_bytes)
    trace = from_experts(routing, n_experts=facts["experts"])
    if capacity < trace.step_size:
        return None
    run = simulate(trace, "belady", capacity)
    decode = trace.step_token >= prompt_tokens
    keys = trace.step_keys[decode]
    misses = int(((keys >= 0) & (run.hit[decode] == 0)).sum())
    miss_bytes = misses * expert_slot_bytes(facts)
    run_misses = int(((trace.step_keys >= 0) & (run.hit == 0)).sum())
    compute = touched_bytes_per_token(facts) / matvec_bytes_per_s
    seconds = max(steps * compute, miss_bytes / disk_bytes_per_s)
    return Bound(steps / seconds, compute, miss_bytes, capacity, steps, run_misses * expert_slot_bytes(facts))


def shortfall(result: dict, bound, disk_bytes_per_s: float) -> dict:
    """Where a run falls short of its bound. read_bytes_per_token: what the engine's process had
    read from storage per decode token (any engine); policy: the expert bytes Belady's cache of
    the same size reads over the whole run from empty, over what moeedge's cache read (1: as
    few; engines that do not count expert reads apart from the rest get None); io: the
    bandwidth moeedge's reads got while one was in flight, over the disk's; occupancy: the
    share of moeedge's decode time in a compute kernel or waiting for a read (the rest is overhead)."""
    out: dict = {"read_bytes_per_token": None, "belady_bytes_per_token": None, "policy_ratio": None,
                 "io_ratio": None, "occupancy": None}
    decode_s = sum(result.get("token_wait_s", [])) + sum(result.get("token_other_s", []))
    if "decode_kernel_s" in result and decode_s > 0:
        out["occupancy"] = (result["decode_kernel_s"] + sum(result["token_wait_s"])) / decode_s
    steps = result.get("tokens", 0) - 1
    if bound is None or steps <= 0:
        return out
    out["belady_bytes_per_token"] = bound.miss_bytes / bound.decode_tokens
    if result.get("decode_read_bytes") is not None:
        out["read_bytes_per_token"] = result["decode_read_bytes"] / steps
    expert_reads = result.get("stats", {}).get("bytes_read")
    if expert_reads is not None:
        out["policy_ratio"] = bound.run_miss_bytes / expert_reads if expert_reads else 1.0
    if result.get("decode_read_busy_s"):
        out["io_ratio"] = result["decode_cache_read_bytes"] / result["decode_read_busy_s"] / disk_bytes_per_s
    return out
