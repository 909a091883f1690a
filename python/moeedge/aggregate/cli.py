"""The `moeedge eval` and `moeedge aggregate` commands. Only argparse at import: `moeedge`
builds every subcommand's parser on each run; torch loads when a command runs. Bad input
raises ValueError, which moeedge.cli.main prints as one line with exit status 2."""
from __future__ import annotations

import argparse
import json

from moeedge.progress import add_quiet
from moeedge.units import format_bytes, parse_bytes


def add_parsers(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="perplexity on a text, and KL and top-1 agreement against a reference")
    ev.add_argument("source", nargs="?", default=None, help="checkpoint to evaluate (default: the bundled model)")
    ev.add_argument("--reference", default=None, help="compare with this checkpoint (same tokenizer)")
    ev.add_argument("--text", default=None, help="UTF-8 text file (default: the default model's held-out corpus)")
    ev.add_argument("--tokens", type=int, default=16384, help="tokens to evaluate (default 16384)")
    ev.add_argument("--window", type=int, default=256,
                    help="tokens per sequence (default 256; Switch: per span-corrupted window)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    add_quiet(ev)
    ev.set_defaults(run=_cmd_eval)

    ag = subparsers.add_parser("aggregate", help="a smaller variant: merge, average, prune, low-rank or distill experts")
    ag.add_argument("source", nargs="?", default=None, help="Hugging Face MoE directory: decoder-only, or Switch Transformers")
    ag.add_argument("--method", required=True,
                    help="merge (aligned, usage-weighted), average, prune, lowrank (shared base plus low-rank "
                         "deltas), or distill (needs --from)")
    ag.add_argument("--from", dest="distill_from", default=None, metavar="METHOD",
                    help="distill's starting variant: merge or lowrank")
    target = ag.add_mutually_exclusive_group(required=True)
    target.add_argument("--experts-per-layer", type=int, default=None, metavar="N")
    target.add_argument("--rank", type=int, default=None, metavar="R",
                        help="rank of each expert's low-rank factors (lowrank, distill --from lowrank)")
    target.add_argument("--expert-memory", type=float, default=None, metavar="FRACTION",
                        help="of the source's expert bytes (low-rank bases count too), split across layers "
                             "by measured sensitivity")
    ag.add_argument("--calibration-tokens", type=int, default=4096,
                    help="tokens of the training corpus to calibrate on (default 4096)")
    ag.add_argument("--eval-tokens", type=int, default=8192,
                    help="held-out tokens to measure the variant on (default 8192; 0: skip)")
    ag.add_argument("--memory-budget", default="auto",
                    help="memory the whole process may use while aggregating, e.g. 8GiB (default: auto); the "
                         "source model gets what the layer being aggregated (about 3x its experts in fp32; lowrank about "
                         "5-6x, its SVD in float64) leaves")
    ag.add_argument("-o", "--output", required=True, help="new directory for the variant")
    ag.add_argument("--json", action="store_true", help="print the variant's description as one JSON object")
    add_quiet(ag)
    ag.set_defaults(run=_cmd_aggregate)


def _cmd_eval(args: argparse.Namespace) -> int:
    from moeedge.evaluate import describe, evaluate, read_text  # lazy: the CLI builds every parser at start

    text = read_text(args.text) if args.text is not None else None
    q = evaluate(args.source, args.reference, text, n_tokens=args.tokens, window=args.window,
                 progress=not args.quiet)
    print(json.dumps(q.as_dict()) if args.json else describe(q, args.source or "default model", args.reference,
                                                              args.text))
    return 0


def _budget(text: str) -> str | int:
    return text if text.strip().lower() in ("auto", "min") else parse_bytes(text)


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from moeedge.aggregate.pipeline import aggregate

    meta = aggregate(args.source, args.method, args.output, experts_per_layer=args.experts_per_layer,
                     rank=args.rank, expert_memory=args.expert_memory, distill_from=args.distill_from,
                     calibration_tokens=args.calibration_tokens, eval_tokens=args.eval_tokens,
                     memory_budget=_budget(args.memory_budget), progress=not args.quiet)
    if args.json:
        print(json.dumps(meta))
        return 0
    source, offloaded, base = meta["expert_bytes_source"], meta["expert_bytes"], meta["base_bytes"]
    after = offloaded + base
    method = meta["method"] + (f" from {meta['distill']['from']}" if "distill" in meta else "")
    ranks = f", ranks {meta['ranks']}" if "ranks" in meta else ""
    print(f"{args.output}: {method}, experts per layer {meta['expert_counts']}{ranks}")
    print(f"expert bytes: {format_bytes(source)} -> {format_bytes(after)} "
          f"(saved {format_bytes(source - after)}, {100 * (source - after) / source:.1f}%)"
          + (f": {format_bytes(base)} resident bases, {format_bytes(offloaded)} offloaded factors" if base else ""))
    if "distill" in meta:
        d = meta["distill"]
        errors = ", ".join(f"{b:.4f} -> {a:.4f}" for b, a in zip(d["held_out_error_before"],
                                                                 d["held_out_error_after"]))
        print(f"layer output error on {d['held_out_tokens']} held-out calibration tokens: {errors}")
    q = meta["quality"]
    if q is not None and "span_loss" in q:
        print(f"held-out span corruption ({q['tokens']} target tokens): loss {q['span_loss']:.4f} vs "
              f"{q['span_loss_reference']:.4f}, accuracy {100 * q['span_accuracy']:.2f}% vs "
              f"{100 * q['span_accuracy_reference']:.2f}%")
    if q is not None:
        print(f"held-out quality against the source ({q['tokens']} tokens): perplexity {q['ppl']:.3f} vs "
              f"{q['ppl_reference']:.3f} (ratio {q['ppl_ratio']:.4f}), KL mean {q['kl_mean']:.4f} "
              f"p99 {q['kl_p99']:.4f} nats/token, top-1 agreement {100 * q['top1_agreement']:.2f}%")
    return 0
