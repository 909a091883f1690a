"""The `moeedge quantize` command. Only argparse at import (moeedge builds every
subcommand's parser on each run); bad input raises ValueError, which moeedge.cli.main
prints as one line with exit status 2."""
from __future__ import annotations

import argparse
import json

from moeedge.progress import add_quiet


def add_quantize_parser(subparsers) -> None:
    q = subparsers.add_parser("quantize", help="experts in moeedge's group-wise int8/int4, per-expert bits optional")
    q.add_argument("source", nargs="?", default=None, help="Hugging Face decoder MoE directory")
    q.add_argument("--bits", type=int, default=None, help="8 or 4: every expert's bits")
    q.add_argument("--group", type=int, default=64, help="weights per fp16 scale: 32, 64 (default) or 128")
    q.add_argument("--per-expert-bits", default=None, metavar="auto",
                   help="auto: 8 bits for the experts whose output suffers most at 4, by calibration")
    q.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="with --per-expert-bits auto: the average bits per expert weight, 4 to 8")
    q.add_argument("--calibration-tokens", type=int, default=4096,
                   help="tokens of the training corpus to calibrate on (default 4096)")
    q.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens to measure the result on (default 8192; 0: skip)")
    q.add_argument("-o", "--output", required=True, help="new directory for the quantized checkpoint")
    q.add_argument("--json", action="store_true", help="print the description (moeedge_quant.json) as JSON")
    add_quiet(q)
    q.set_defaults(run=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from moeedge.quantize.writer import describe, quantize_checkpoint

    meta = quantize_checkpoint(args.source, args.output, bits=args.bits, group=args.group,
                               per_expert_bits=args.per_expert_bits, target_bits=args.target_bits,
                               calibration_tokens=args.calibration_tokens, eval_tokens=args.eval_tokens,
                               progress=not args.quiet)
    print(json.dumps(meta) if args.json else describe(meta, args.output))
    return 0
