"""Expert aggregation: smaller variants of a decoder-only or Switch Transformers MoE
checkpoint that moeedge loads like any other (`moeedge aggregate`, issue #7).

- `calibration`: runs the source model over training-corpus text and keeps, per MoE layer,
  the hidden states entering it, how the router used each expert, and which tokens are
  held out from fitting;
- `layer`: one MoE layer's experts, router and calibration states, and its output under a
  variant (a router-to-stored-expert table and the stored experts, or low-rank factors);
- `clustering`: the merge tree of a layer's experts (average linkage on their mean outputs);
- one file per method: `merge` (aligned, usage-weighted), `average` (plain mean), `prune`,
  `lowrank` (shared base plus low-rank deltas), `distill` (fits a merged or low-rank
  variant to the source layer's output);
- `targets`: each layer's level (experts or rank), uniform or split by measured sensitivity;
- `variant`: the output directory; `pipeline`: the whole run; `cli`: the commands.
"""
