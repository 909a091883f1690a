"""The variant ladder and the plan that picks from it (docs/controller.md).

- `pack`: where a ladder lives (a directory keyed by the source's identity), its
  manifest, and resuming a build layer by layer;
- `variants`: the representations of one MoE layer (int8, int4, per-expert bits,
  low-rank ranks, merged granularities), built with moeedge.quantize's and
  moeedge.aggregate's code, each with its bytes and its layer's output error;
- `build`: `moeedge ladder`: calibrate, build each layer, then measure each variant end
  to end (KL, top-1 agreement on held-out text) with only its layer changed;
- `compose`: a source checkpoint whose layers are read in the variants a plan names,
  each representation under its own cache keys (moeedge.keys.VariantKey);
- `machine`: disk and kernel bandwidths measured on this machine, cached;
- `cost`: expected seconds per token of a plan (reads and compute, decode and prefill);
- `planner`: `moeedge plan`: the plan that minimises time per token in a budget and a
  quality tolerance, and the frontier;
- `cli`: the commands (only argparse at import).
"""
