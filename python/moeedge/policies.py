"""Expert-cache policies by name, and the constants of the "predicted" rule: one place
for the runtime (moeedge.runtime.predicted_eviction, the runners' policies) and the
simulator (moeedge.sim), which both import it. The rule itself is described in
moeedge.sim.predicted, which measures it; the runtime keeps the same estimates."""
from __future__ import annotations

# What the native cache and the runners take ("predicted": the native "score" policy,
# scored before each MoE layer from the predictor's guesses).
RUNTIME_POLICIES = ("lru", "lfu", "score", "predicted")
# What the simulator replays (moeedge.sim.policies).
SIM_POLICIES = ("lru", "lfu", "lfru", "layer", "score", "predicted", "belady")

# The "predicted" policy's two constants, kept apart from the simulator's numba loop
# because the runtime uses them and must not load numba (60 MiB of the process's fixed
# cost). Chosen on the default model's held-out trace, the pair that was best or within
# 0.002 of it at every capacity from 8 to 24 in both halves of the trace:
# - PICK_RATE_ALPHA: the newest token's weight in each expert's moving pick rate
#   (0.03-0.05 beat 0.1 by up to 0.004 of hit rate at 16-24, tied at 8-12);
# - PREDICTED_DISCOUNT: a use's worth falls by this factor per step until it comes
#   (0.7-0.8 within 0.002 of each other; 0.9 lost 0.01 at 8, 0.5 lost 0.005 everywhere).
PICK_RATE_ALPHA = 0.03
PREDICTED_DISCOUNT = 0.75


def later_visits(n_layers: int, discount: float = PREDICTED_DISCOUNT) -> float:
    """The discounted worth of every visit after the next, per unit of pick rate: the
    schedule comes back to a layer every n_layers steps, g**L + g**2L + ... = g**L / (1 - g**L)."""
    return discount ** n_layers / (1.0 - discount ** n_layers)
