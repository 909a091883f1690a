"""`moeedge predict train|eval`: train the trace-based predictors, measure every predictor."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeedge.predict import PREDICTORS
from moeedge.progress import add_quiet, progress_bar


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="train and measure expert predictors on routing traces")
    sub = p.add_subparsers(dest="predict_command", required=True)
    train = sub.add_parser("train", help="train the history and learned predictors on a trace (--hidden)")
    train.add_argument("trace", help="a training trace written by `moeedge trace --hidden` (training text)")
    train.add_argument("-o", "--output", required=True,
                       help="predictor file to write; name it moeedge_predictor.safetensors inside the "
                            "checkpoint directory and moeedge.load picks it up")
    train.add_argument("--epochs", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--width", type=int, default=None, help="hidden units of each net's layers (default 256)")
    train.add_argument("--depth", type=int, default=None, help="hidden layers of each net (default 1)")
    train.add_argument("--jobs", type=int, default=1,
                       help="train nets in this many processes, one torch thread each (the same nets as one; "
                            "each holds one net's features: about 3 GB at 2M tokens)")
    add_quiet(train)
    train.set_defaults(run=_cmd_train)
    ev = sub.add_parser("eval", help="recall and precision of each predictor, 1 to 3 layers ahead")
    ev.add_argument("trace", help="a held-out trace written by `moeedge trace --hidden`")
    ev.add_argument("--model", default=None, help="the checkpoint (default: the trace's own model)")
    ev.add_argument("--predictor-file", default=None,
                    help="trained predictors (default: moeedge_predictor.safetensors beside the model)")
    ev.add_argument("--predictors", default=",".join(PREDICTORS), help="comma-separated (default: all)")
    ev.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(run=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    from moeedge.predict.bundle import train_bundle
    from moeedge.predict.learned import DEPTH, LOOKAHEAD, WIDTH, pairs
    from moeedge.predict.metrics import load_routing

    trace = load_routing(args.trace, need_hidden=True)
    width = WIDTH if args.width is None else args.width
    depth = DEPTH if args.depth is None else args.depth
    for name, value in (("--epochs", args.epochs), ("--width", width), ("--depth", depth), ("--jobs", args.jobs)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    with progress_bar(total=len(pairs(trace.n_layers, LOOKAHEAD)), desc="learned predictor", unit="net",
                      show=not args.quiet) as bar:
        bundle = train_bundle(trace, epochs=args.epochs, seed=args.seed, progress=lambda *_: bar.update(),
                              width=width, depth=depth, jobs=args.jobs)
    path = bundle.save(args.output)
    print(f"{path}: trained on {bundle.meta['train_tokens']} tokens of {args.trace} "
          f"in {bundle.meta['train_seconds']} s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from moeedge.predict.metrics import evaluate, load_routing

    names = [n.strip() for n in args.predictors.split(",") if n.strip()]
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown or not names:
        raise ValueError(f"--predictors: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(PREDICTORS)}")
    trace = load_routing(args.trace, need_hidden=True)
    if args.max_tokens is not None:
        trace = trace.tokens(0, args.max_tokens)
    results = {}
    for name in names:
        acc = evaluate(build_predictor(name, args.model, args.predictor_file, trace), trace)
        results[name] = acc.summary(3)
    if args.json:
        print(json.dumps(results))
        return 0
    k = trace.top_k
    sizes = sorted({k, min(2 * k, trace.n_experts)})
    head = "".join(f"  d{d} r@{n}" for d in (1, 2, 3) for n in sizes)
    print(f"{trace.experts.shape[0]} tokens, {trace.n_layers} MoE layers, top-{k} of {trace.n_experts}; "
          f"recall of the top-n guesses d layers ahead (', next': past the last layer, the next token's)")
    print(f"{'predictor':16}{head}")
    for name, summary in results.items():
        for suffix, label in (("", name), ("_next", f"{name}, next")):
            if not any(f"d{d}{suffix}" in summary for d in (1, 2, 3)):
                continue
            cells = "".join(f"{summary[f'd{d}{suffix}'][f'recall@{n}']:8.3f}" if f"d{d}{suffix}" in summary
                            else f"{'-':>8}" for d in (1, 2, 3) for n in sizes)
            print(f"{label:16}{cells}")
    return 0


def build_predictor(name: str, model: str | None, predictor_file: str | None, trace):
    """The predictor `name` for the trace's model (or `model`), trained ones from
    predictor_file or the file beside the model."""
    from moeedge.formats.open import open_checkpoint
    from moeedge.formats.hf_config import DecoderConfig
    from moeedge.predict import NEEDS_FILE, make_predictor
    from moeedge.predict.bundle import FILENAME, load_bundle

    source = model or trace.model
    if not source:
        raise ValueError(f"{trace.source} does not say which model it came from: pass --model")
    ckpt = open_checkpoint(source)
    if not isinstance(ckpt.config, DecoderConfig):
        raise ValueError(f"{source}: expert prediction covers decoder-only models")
    bundle = None
    if name in NEEDS_FILE:
        path = Path(predictor_file) if predictor_file else Path(ckpt.source) / FILENAME  # a repo id: its snapshot
        if not path.is_file():
            raise ValueError(f"predictor {name!r} needs a trained predictor file; {path} does not exist "
                             f"(moeedge predict train)")
        bundle = load_bundle(path, len(ckpt.config.moe_layers), ckpt.config.n_experts)
    dense = {} if name not in ("stale-gate",) else {n: ckpt.read_dense(n) for n in ckpt.dense_names
                                                       if n.endswith("gate.weight")}
    return make_predictor(name, ckpt.config, dense, bundle)
