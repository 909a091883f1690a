"""`moeedge serve [SOURCE]`: load a model with one KV slot per concurrent request and serve
it over HTTP (OpenAI's API, /metrics, a chat page at /) with uvicorn, one worker.

Only argparse here at import: `moeedge` builds every subcommand's parser on each run."""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys

from moeedge.serve.speculative import add_draft_argument, refuse_draft
from moeedge.units import parse_bytes

PROBE = [{"role": "user", "content": "Hello"}]


class _Usage(ValueError):
    """Bad input: moeedge.cli.main prints one line and exits 2 for a ValueError."""


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server that decodes concurrent requests "
                                            "together")
    p.add_argument("source", nargs="?", default=None,
                   help="Hugging Face checkpoint directory or .gguf file (default: the bundled model)")
    p.add_argument("--memory-budget", default="auto",
                   help="memory the whole process may use, e.g. 1.5GiB, or min, or auto (default)")
    p.add_argument("--max-context", type=int, default=2048, help="tokens of context of each slot (default 2048)")
    p.add_argument("--max-batch", type=int, default=4,
                   help="KV slots: requests decoded together, each with max-context tokens (default 4)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 (default 64)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=os.environ.get("MOEEDGE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $MOEEDGE_API_KEY, else none)")
    p.add_argument("--model-id", default=None, help="the model's name in the API (default: the checkpoint's)")
    p.add_argument("--max-body", default="4MiB", help="largest request body (default 4MiB); larger get 413")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may take to finish after SIGTERM before they are "
                        "cancelled (default 10)")
    p.add_argument("--policy", choices=("auto", "lru", "lfu", "score", "predicted"), default="auto",
                   help="expert cache eviction policy (default auto, as for run)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: every CPU this process may run on)")
    from moeedge.peers.cli import add_peer_client_options
    add_peer_client_options(p)   # decode steps of several sequences call peers too (docs/peers.md)
    add_draft_argument(p)
    p.set_defaults(run=run_serve)
    return p


def _check(args: argparse.Namespace) -> dict:
    refuse_draft(args.draft)
    if args.max_context < 1:
        raise _Usage(f"--max-context must be positive, got {args.max_context}")
    if not 1 <= args.max_batch <= 256:
        raise _Usage(f"--max-batch must be from 1 to 256, got {args.max_batch}")
    if args.max_queue < 0:
        raise _Usage(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise _Usage(f"--port must be from 0 to 65535, got {args.port}")
    if not args.shutdown_timeout >= 0:
        raise _Usage(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.threads is not None and args.threads < 1:
        raise _Usage(f"--threads must be at least 1, got {args.threads}")
    if not args.peer_deadline > 0:
        raise _Usage(f"--peer-deadline must be positive, got {args.peer_deadline}")
    if args.api_key is not None and not args.api_key.strip():
        raise _Usage("--api-key is empty")
    budget = args.memory_budget.strip().lower()
    max_body = parse_bytes(args.max_body)
    if max_body < 1:
        raise _Usage(f"--max-body must be positive, got {args.max_body}")
    return {"memory_budget": budget if budget in ("auto", "min") else parse_bytes(args.memory_budget),
            "max_body": max_body}


def check_servable(model) -> None:
    """A model serve can answer chats with: a decoder with a tokenizer whose chat template
    renders in the sandbox (a template that fails or runs past its limits is refused now,
    not on the first client's request)."""
    if model.encoder_decoder:
        raise _Usage("serve runs decoder-only models; this one is an encoder-decoder (Switch)")
    if model.tokenizer is None:
        raise _Usage(f"{model.checkpoint.source} has no tokenizer files: serve needs one")
    try:
        model.tokenizer.encode_chat(PROBE)
    except ValueError as e:
        raise _Usage(f"refusing to serve: the chat template cannot be rendered safely ({e})") from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    options = _check(args)
    # The web stack first: load() measures what the process holds before the model as its fixed cost.
    import uvicorn

    from moeedge.api import load
    from moeedge.serve.app import create_app
    from moeedge.serve.engine import Engine
    from moeedge.serve.generation import Served

    model = load(args.source, memory_budget=options["memory_budget"], max_context=args.max_context,
                 n_sequences=args.max_batch, threads=args.threads, policy=args.policy,
                 peers=args.peer, peer_deadline=args.peer_deadline, peer_identity=args.peer_identity)
    engine = None
    try:
        check_servable(model)
        engine = Engine(model, args.max_batch, args.max_queue)
        model_id = args.model_id or os.path.basename(os.path.normpath(str(model.checkpoint.source)))
        served = Served(engine, model.tokenizer, model_id, model.runner.max_context, args.shutdown_timeout,
                        model.sampling_defaults)
        app = create_app(served, model, api_key=args.api_key, max_body_bytes=options["max_body"])
        if not _loopback(args.host) and args.api_key is None:
            print(f"moeedge serve: warning: listening on {args.host} without --api-key: anyone who can reach "
                  f"this port can use the model", file=sys.stderr)
        print(f"moeedge serve: {model_id} on http://{args.host}:{args.port} ({args.max_batch} slots of "
              f"{model.runner.max_context} tokens; {model.plan.describe()})", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level="warning",
                                timeout_graceful_shutdown=args.shutdown_timeout + 2)
        server = uvicorn.Server(config)
        # uvicorn raises SIGTERM again once it has shut down: let that end run() here, so the
        # engine stops and the model closes, and the command exits 0
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if not server.started:
            raise OSError(f"could not listen on {args.host}:{args.port} (in use, or not an address here?)")
    finally:
        if engine is not None:
            engine.close()
        model.close()
    return 0
