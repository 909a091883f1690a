"""What `moeedge ladder` and `moeedge plan` print."""
from __future__ import annotations

from moeedge.units import format_bytes


def describe_ladder(out, manifest: dict) -> str:
    lines = [f"ladder of {manifest['source']} in {out}",
             f"{'layer':>5}  {'variant':<12} {'bytes':>10}  {'layer error':>11}  {'KL (alone)':>10}  {'top-1':>7}"]
    for i, layer in sorted(manifest["layers"].items(), key=lambda kv: int(kv[0])):
        quality = manifest["quality"].get(i, {})
        for name, v in layer["variants"].items():
            q = quality.get(name)
            kl = f"{q['kl_mean']:.2e}" if q else ("-" if v["loadable"] else "not loadable")
            top1 = f"{100 * q['top1_agreement']:.2f}%" if q else ""
            lines.append(f"{i:>5}  {name:<12} {format_bytes(v['bytes']):>10}  {v['error']:>11.4f}  {kl:>10}  {top1:>7}")
    return "\n".join(lines)


def describe_plan(plan, checked: dict | None) -> str:
    c = plan.choice
    m = plan.memory
    lines = [f"budget {format_bytes(m.budget_bytes)}: fixed {format_bytes(m.fixed_bytes)}, dense "
             f"{format_bytes(m.dense_bytes)}, KV {format_bytes(m.kv_cache_bytes)}, buffers "
             f"{format_bytes(m.buffer_bytes)}, expert cache {format_bytes(c.cache_bytes)}",
             f"chosen (--max-kl {plan.max_kl:g}): {', '.join(f'{i}:{v}' for i, v in enumerate(c.chosen.variants))}",
             f"  expected {c.chosen.tok_s:.1f} tok/s decode ({c.chosen.detail['prefill_tok_s']:.0f} prefill), "
             f"hit rate {c.chosen.detail['hit_rate']:.1%}, expert bytes {format_bytes(c.chosen.detail['expert_bytes'])}, "
             f"KL (sum of layers) {c.chosen.kl:.2e}",
             f"  binds: {c.binds}"]
    if c.lossless is not None and c.lossless is not c.chosen:
        lines.append(f"  lossless plan: {c.lossless.tok_s:.1f} tok/s")
    if checked is not None:
        lines.append(f"  measured end to end ({checked['tokens']} held-out tokens): KL {checked['kl_mean']:.2e} "
                     f"(predicted {checked['kl_sum_predicted']:.2e}), top-1 agreement "
                     f"{100 * checked['top1_agreement']:.2f}%, perplexity ratio {checked['ppl_ratio']:.4f}")
    lines.append("frontier at this budget (KL sum -> tok/s):")
    for p in c.frontier:
        mark = "  <- chosen" if p.variants == c.chosen.variants else ""
        lines.append(f"  {p.kl:.2e}  {p.tok_s:8.1f}  {','.join(p.variants)}{mark}")
    return "\n".join(lines)
