"""Switch a loaded model's MoE layers to other variants between two tokens.

An adaptive model's store holds every variant the ladder built (moeedge.ladder.compose.
compose_all), each under its own keys, so a switch reads nothing by itself: it changes
which key each (layer, expert) is read under. In this order, so that the cache never
holds more than the memory plan in force at any moment:

1. queued and running guesses are cancelled (they may be of the old representation);
2. the switched layers' old representation is evicted (ExpertCache.drop), its memory
   released before anything of the new one is read;
3. the layers are read in their new variants from the next token on;
4. the cache's budget is set to the new memory plan's share (a shrink evicts first);
5. in the background, the experts that were resident in the old representation are read
   in the new one, as far as the cache has free room (lowest priority: a token's own
   reads go first; what finds no room is dropped). Others come as tokens route to them.

The outputs after a switch equal a model loaded with that plan from the start: the same
bytes under the same layouts, multiplied by the same kernels (tests/test_adaptive.py).
"""
from __future__ import annotations

import time
from dataclasses import replace

from moeedge.keys import expert_key, split_key
from moeedge.ladder.variants import LOADABLE
from moeedge.runtime.plan import MemoryPlan, expert_budget, shrink_cache

NAMES = {vid: name for name, vid in LOADABLE.items()}
GROW_PRIORITY = -1  # below a token's own guesses (priority 0 and up)


def variant_names(layer_variants: dict[int, int], n_layers: int) -> list[str]:
    return [NAMES[layer_variants.get(layer, 0)] for layer in range(n_layers)]


def switch_variants(model, variants: list[str], memory: MemoryPlan | None = None) -> dict:
    """Read MoE layer i in variants[i] from the next token on, within memory (default: the
    plan in force); what changed. Call between two tokens, holding the model."""
    experts, cache, cfg = model.runner.experts, model.cache, model.config
    n_layers = len(cfg.moe_layers)
    if len(variants) != n_layers or any(v not in LOADABLE for v in variants):
        raise ValueError(f"a switch names one loadable variant ({', '.join(LOADABLE)}) per MoE layer ({n_layers}), "
                         f"got {variants}")
    new = {layer: LOADABLE[name] for layer, name in enumerate(variants) if name != "stored"}
    old = dict(experts.layer_variants)
    changed = [layer for layer in range(n_layers) if old.get(layer, 0) != new.get(layer, 0)]
    store = cache.store
    for layer in changed:
        key = expert_key(layer, 0, new.get(layer, 0))
        if key not in store:
            raise ValueError(f"layer {layer}: this model was not loaded with its {variants[layer]!r} variant "
                             f"(load with adaptive=True and a ladder that has it)")
    memory = memory or model.plan
    before = variant_names(old, n_layers)
    cache.cancel_prefetches()
    dead = {expert_key(layer, e, old.get(layer, 0)) for layer in changed for e in range(cfg.n_experts)}
    was_resident = [k for k in cache.resident_keys() if k in dead]
    freed = cache.drop(sorted(dead))
    experts.layer_variants.clear()
    experts.layer_variants.update(new)
    target = expert_budget(memory, experts.current_bytes())
    if target < cache.budget_bytes:
        shrink_cache(cache, target)
    else:
        cache.set_budget(target)
    model.plan = replace(memory, expert_variants=tuple(variants))
    room = target - cache.stats()["resident_bytes"]
    warm = []
    for key in was_resident:
        layer, e, _ = split_key(key)
        again = expert_key(layer, e, new.get(layer, 0))
        if store.slot_bytes(again) <= room:
            warm.append(again)
            room -= store.slot_bytes(again)
    if warm:
        cache.prefetch(warm, GROW_PRIORITY)
    return {"at": time.time(), "before": before, "after": list(variants), "layers": changed,
            "released_bytes": freed, "warming": len(warm), "expert_cache_bytes": target,
            "resident_bytes": cache.stats()["resident_bytes"]}
