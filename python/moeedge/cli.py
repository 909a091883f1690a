"""The `moeedge` command. Bad input exits with status 2 and one line on stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import asdict

from moeedge import __version__, extras
from moeedge.progress import add_quiet
from moeedge.units import format_bytes, parse_bytes


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, like every other bad input (--help still shows usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_bench_io(args: argparse.Namespace) -> int:
    from moeedge.iobench import measure_io

    if not os.path.isdir(args.dir):
        raise UsageError(f"--dir {args.dir!r} is not a directory")
    if not os.access(args.dir, os.W_OK):
        raise UsageError(f"--dir {args.dir!r} is not writable")
    if args.expert_bytes <= 0 or args.file_bytes < args.expert_bytes:
        raise UsageError(f"--file-bytes ({args.file_bytes}) must hold at least one expert of "
                         f"--expert-bytes ({args.expert_bytes}), and both must be positive")
    free = os.statvfs(args.dir).f_bavail * os.statvfs(args.dir).f_frsize
    if args.file_bytes > free // 2:
        raise UsageError(f"--file-bytes {format_bytes(args.file_bytes)} is more than half the free space "
                         f"in {args.dir} ({format_bytes(free)})")
    report = measure_io(args.dir, args.file_bytes, args.expert_bytes)
    if args.json:
        print(json.dumps(asdict(report)))
        return 0

    def show(gbps: float | None) -> str:
        return "refused" if gbps is None else f"{gbps:6.2f} GB/s"

    print(f"cold reads of {format_bytes(report.file_bytes)} in {args.dir}, "
          f"experts of {format_bytes(report.expert_bytes)}:")
    print(f"  sequential 4 MiB, O_DIRECT (ceiling)  {show(report.sequential_direct_gbps)}")
    print(f"  sequential 4 MiB, buffered            {show(report.sequential_buffered_gbps)}")
    print(f"  expert cache, O_DIRECT                {show(report.cache_direct_gbps)}")
    print(f"  expert cache, buffered                {show(report.cache_buffered_gbps)}")
    if report.direct_io_fallback:
        print(f"  note: {report.direct_io_fallback}")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None,
                   help="Hugging Face checkpoint directory, .gguf file, or hub repo id (org/name, org/name@revision, "
                        "org/name-GGUF:Q4_K_M) (default: the bundled model)")
    p.add_argument("--memory-budget", default="auto", type=_budget,
                   help="memory the whole process may use, e.g. 1.5GiB, or min: the smallest workable "
                        "(default: auto)")
    p.add_argument("--max-context", type=int, default=2048, help="tokens of context (default 2048)")
    p.add_argument("--policy", choices=("auto", "lru", "lfu", "score", "predicted"), default="auto",
                   help="expert cache eviction policy (predicted: the next use estimated from the layer schedule, "
                        "pick rates and the predictor; auto: predicted, lru for Switch)")
    p.add_argument("--prefetch", dest="prefetch", action="store_true", default=None,
                   help="also read the next layers' guessed experts early (default off for decoders, whose "
                        "guesses then feed eviction only; on for Switch)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    p.add_argument("--predictor", default="auto",
                   help="what guesses the next layers' experts: auto (default), stale-gate, learned, history, "
                        "frequency, previous")
    p.add_argument("--lookahead", type=int, default=1, help="MoE layers ahead to prefetch (1-3, default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: every CPU this process may run on)")
    p.add_argument("--plan", default=None, help="a plan file from `moeedge plan -o`: each MoE layer's variant")
    from moeedge.peers.cli import add_peer_client_options
    add_peer_client_options(p)


def _budget(text: str) -> str | int:
    return text if text.strip().lower() in ("auto", "min") else _byte_count(text)


def _load(args: argparse.Namespace):
    from moeedge.api import load

    if args.max_context < 1:
        raise UsageError(f"--max-context must be positive, got {args.max_context}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    return load(args.source, memory_budget=args.memory_budget, max_context=args.max_context,
                policy=args.policy, prefetch=args.prefetch, predictor=args.predictor, lookahead=args.lookahead,
                threads=args.threads, plan=args.plan,
                peers=args.peer, peer_deadline=args.peer_deadline, peer_identity=args.peer_identity,
                draft=getattr(args, "draft", None), **_adaptive(args))


def _adaptive(args: argparse.Namespace) -> dict:
    if not hasattr(args, "adaptive"):
        return {}
    if args.max_kl is not None and not args.adaptive:
        raise UsageError("--max-kl is the adaptive controller's tolerance: give --adaptive too")
    if args.max_kl is not None and not args.max_kl >= 0:
        raise UsageError(f"--max-kl must be at least 0, got {args.max_kl}")
    return {"adaptive": args.adaptive, "max_kl": args.max_kl or 0.0}


def _adaptive_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adaptive", action="store_true",
                   help="re-plan each MoE layer's variant between tokens as the budget, the disk and the input "
                        "change (the source's ladder, or --plan's; docs/controller.md)")
    p.add_argument("--max-kl", type=float, default=None,
                   help="with --adaptive: the KL per token (nats) a plan may cost; default 0: lossless")


def _draft_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", default=None,
                   help="speculative decoding's draft: auto (a one-expert-per-layer variant beside the checkpoint "
                        "or in moeedge's cache) or a variant's directory (moeedge aggregate --method merge "
                        "--experts-per-layer 1); default: off")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    sampling = p.add_argument_group("sampling (default: the model's generation_config.json or GGUF general.sampling.*, "
                                    "else llama.cpp's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05)")
    sampling.add_argument("--temperature", type=float, default=None, help="0 is greedy")
    sampling.add_argument("--top-k", type=int, default=None, help="0 is off")
    sampling.add_argument("--top-p", type=float, default=None, help="1 is off")
    sampling.add_argument("--min-p", type=float, default=None, help="0 is off")
    sampling.add_argument("--repeat-penalty", type=float, default=None, help="1 is off (the default)")
    sampling.add_argument("--repeat-last-n", type=int, default=None,
                          help="tokens the repeat penalty looks back over (default 64)")
    sampling.add_argument("--seed", type=int, default=None, help="makes a sampled answer reproducible")
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="stop the answer at this text (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    """The sampling flags given (None: the model's default), checked before the model loads."""
    from moeedge.runtime.sampling import SamplingParams

    given = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                    "repeat_last_n", "seed")}
    try:
        SamplingParams(**{name: value for name, value in given.items() if value is not None})
    except ValueError as e:
        name = next(n for n in given if str(e).startswith(n))  # the message starts with the field's name
        raise UsageError(f"--{name.replace('_', '-')}{str(e)[len(name):]}") from None
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.stop is not None and not all(args.stop):
        raise UsageError("--stop needs some text")
    return {**given, "stop": args.stop}


def _cmd_info(args: argparse.Namespace) -> int:
    from moeedge.info import describe

    print(describe(args.source, args.max_context, json_out=args.json))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    with _load(args) as model:
        if model.tokenizer is not None and not model.tokenizer.encode(args.prompt):
            # a tokenizer without a BOS token makes nothing of an empty prompt, and nothing cannot be prefilled
            raise UsageError(f"--prompt {args.prompt!r} is no tokens: give some text")
        if args.json:
            text = model.generate(args.prompt, args.max_new_tokens, **sampling)
            print(json.dumps({"text": text, "stats": model.stats()}, default=str))
        else:
            for piece in model.stream(args.prompt, args.max_new_tokens, **sampling):
                print(piece, end="", flush=True)
            print()
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from moeedge.chat_cli import ChatSettings, run_chat

    settings = ChatSettings(args.max_new_tokens, _sampling(args), args.system)
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 typed in becomes lone surrogates, refused per line
        sys.stdin.reconfigure(errors="surrogateescape")
    with _load(args) as model:
        return run_chat(model, settings)


def _cmd_trace(args: argparse.Namespace) -> int:
    from moeedge.trace import record, save

    if args.corpus:
        import random

        from moeedge.data.corpus import collect

        texts = collect().texts(args.corpus)
        random.Random(0).shuffle(texts)  # so that --max-tokens samples the whole split, the same every run
        text = "\n".join(texts)
    else:
        try:
            text = open(args.text, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise UsageError(f"--text {args.text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    with _load(args) as model:
        trace = record(model, text, hidden=args.hidden, window=args.window, max_tokens=args.max_tokens,
                       progress=not args.quiet)
    path = save(trace, args.output)
    print(f"{path}: {len(trace['tokens'])} tokens, experts {list(trace['experts'].shape)}"
          + (f", encoder {list(trace['experts_encoder'].shape)}" if "experts_encoder" in trace else ""))
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    from moeedge._core import cpu_features

    flags = [name for name, present in cpu_features().items() if present]
    print(f"moeedge {__version__}; CPU features: {', '.join(flags) or 'none detected'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeedge", description=__doc__.splitlines()[0])
    parser.add_argument("-V", "--version", action="version", version=f"moeedge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    version = sub.add_parser("version", help="version and the CPU features moeedge detected")
    version.set_defaults(run=_cmd_version)

    info = sub.add_parser("info", help="architecture, sizes and the smallest workable memory budget")
    info.add_argument("source", nargs="?", default=None)
    info.add_argument("--max-context", type=int, default=2048)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_cmd_info)

    run = sub.add_parser("run", help="generate text from a prompt")
    _model_options(run)
    _draft_option(run)
    _adaptive_options(run)
    run.add_argument("--prompt", required=True)
    _sampling_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object with the text and stats()")
    run.set_defaults(run=_cmd_run)

    chat = sub.add_parser("chat", help="interactive conversation")
    _model_options(chat)
    _draft_option(chat)
    _adaptive_options(chat)
    _sampling_options(chat)
    chat.add_argument("--system", default=None, help="a system message that starts the conversation")
    chat.set_defaults(run=_cmd_chat)

    trace = sub.add_parser("trace", help="record which experts each token picks, over a text (.npz)")
    _model_options(trace)
    text = trace.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="UTF-8 text file")
    text.add_argument("--corpus", choices=("train", "heldout"),
                      help="the default model's corpus (this Python's standard library): its training "
                           "files or its held-out packages")
    trace.add_argument("-o", "--output", default="trace.npz")
    trace.add_argument("--hidden", action="store_true", help="also record the hidden state entering each MoE layer")
    trace.add_argument("--window", type=int, default=512, help="tokens per sequence (default 512)")
    trace.add_argument("--max-tokens", type=int, default=None)
    add_quiet(trace)
    trace.set_defaults(run=_cmd_trace)

    from moeedge.sim.cli import add_sim_parser
    add_sim_parser(sub)
    from moeedge.aggregate.cli import add_parsers as add_eval_and_aggregate_parsers
    add_eval_and_aggregate_parsers(sub)
    from moeedge.predict.cli import add_predict_parser
    add_predict_parser(sub)
    from moeedge.quantize.cli import add_quantize_parser
    add_quantize_parser(sub)
    from moeedge.serve.cli import add_serve_parser
    add_serve_parser(sub)
    from moeedge.ladder.cli import add_parsers as add_ladder_and_plan_parsers
    add_ladder_and_plan_parsers(sub)
    from moeedge.peers.cli import add_peer_parsers
    add_peer_parsers(sub)

    bench = sub.add_parser("bench", help="measure this machine")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    io = bench_sub.add_parser("io", help="cold read throughput of the disk and of the expert cache")
    io.add_argument("--dir", default="/var/tmp", help="where to write the scratch file (default /var/tmp)")
    io.add_argument("--file-bytes", type=_byte_count, default="512MiB", help="scratch file size (default 512MiB)")
    io.add_argument("--expert-bytes", type=_byte_count, default="8MiB", help="expert size (default 8MiB)")
    io.add_argument("--json", action="store_true", help="print one JSON object")
    io.set_defaults(run=_cmd_bench_io)
    from moeedge.harness.cli import add_bench_parsers
    add_bench_parsers(bench_sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line on stderr, like an error (not Python's file:line: Category: form)."""
    print(f"moeedge: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        extras.check(args)
        return args.run(args)
    except BrokenPipeError:  # `moeedge run ... | head`: the reader left; end quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except ImportError as e:  # a module of an extra that is not installed: say which extra
        if (hint := extras.explain(e)) is None:
            raise
        print(f"moeedge: error: {hint}", file=sys.stderr)
        return 2
    except (UsageError, OSError, ValueError, MemoryError) as e:
        # Bad input of every kind (CheckpointError and ContextOverflowError are
        # ValueErrors, BudgetError a MemoryError): one line, no traceback.
        print(f"moeedge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
