"""The `moeedge ladder` and `moeedge plan` commands. Only argparse at import; bad input
raises ValueError, which moeedge.cli.main prints as one line with exit status 2."""
from __future__ import annotations

import argparse
import json


def add_parsers(subparsers) -> None:
    lad = subparsers.add_parser("ladder", help="build each MoE layer's variants (int8, int4, per-expert bits, "
                                               "low-rank, merged) with their bytes and measured quality")
    lad.add_argument("source", nargs="?", default=None, help="Hugging Face decoder MoE directory (default: the "
                                                               "bundled model)")
    lad.add_argument("-o", "--output", default=None,
                     help="the pack's directory (default: $XDG_CACHE_HOME/moeedge/ladders/<source identity>); "
                          "an unfinished build there resumes")
    lad.add_argument("--calibration-tokens", type=int, default=2048, help="training-split tokens (default 2048)")
    lad.add_argument("--eval-tokens", type=int, default=2048,
                     help="held-out tokens each variant is measured on end to end (default 2048; 0: skip)")
    lad.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    lad.add_argument("--memory-budget", default="auto", help="for the source while calibrating (default auto)")
    lad.add_argument("--json", action="store_true", help="print the manifest as JSON")
    lad.set_defaults(run=_cmd_ladder)

    plan = subparsers.add_parser("plan", help="per MoE layer the variant, and the expert cache, fastest in a "
                                              "memory budget and a quality tolerance")
    plan.add_argument("source", nargs="?", default=None)
    plan.add_argument("--memory-budget", required=True, help="memory the whole process may use, e.g. 300MiB")
    plan.add_argument("--max-kl", type=float, default=0.0,
                      help="the most KL (nats per token, summed over layers) the plan may add; 0: lossless")
    plan.add_argument("--ladder", default=None, help="the ladder's directory (default: the source's cache one)")
    plan.add_argument("--max-context", type=int, default=2048)
    plan.add_argument("-o", "--output", default=None, help="write the plan for moeedge.load(plan=...)")
    plan.add_argument("--check", action="store_true", help="measure the chosen plan end to end on held-out text")
    plan.add_argument("--remeasure", action="store_true", help="measure this machine again (cached otherwise)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(run=_cmd_plan)


def _cmd_ladder(args: argparse.Namespace) -> int:
    from moeedge.ladder.build import build_ladder
    from moeedge.ladder.report import describe_ladder

    out, manifest = build_ladder(args.source, args.output, calibration_tokens=args.calibration_tokens,
                                 eval_tokens=args.eval_tokens, window=args.window,
                                 memory_budget=args.memory_budget, progress=not args.json)
    print(json.dumps(manifest) if args.json else describe_ladder(out, manifest))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from moeedge.ladder.plan_source import check, plan_source, write_plan
    from moeedge.ladder.report import describe_plan

    plan = plan_source(args.source, args.memory_budget, args.max_kl, args.ladder, args.max_context,
                       args.remeasure)
    checked = check(plan) if args.check else None
    if args.output:
        write_plan(plan, args.output)
    if args.json:
        print(json.dumps({**plan.as_dict(), "check": checked}))
    else:
        print(describe_plan(plan, checked))
    return 0
