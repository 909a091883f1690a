"""`moeedge sim TRACE`: replay a routing trace through cache policies (moeedge.sim).

Only argparse here at import: `moeedge` builds every subcommand's parser on each run,
and numba loads when `sim` runs.
"""
from __future__ import annotations

import argparse
import json
import os

from moeedge.sim import POLICIES
from moeedge.units import format_bytes, parse_bytes


class _Usage(ValueError):
    """Bad input: moeedge.cli.main prints one line and exits 2 for a ValueError."""


def add_sim_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sim", help="simulate expert-cache policies over a routing trace (moeedge trace)")
    p.add_argument("trace", help="a routing trace .npz written by `moeedge trace`")
    p.add_argument("--capacity", default=None,
                   help="experts (16) or bytes (512MiB), in one cache shared by all layers, or per layer "
                        "with --per-layer (default: a quarter of the experts)")
    p.add_argument("--per-layer", action="store_true", help="one cache of --capacity per MoE layer")
    p.add_argument("--policy", default=",".join(POLICIES),
                   help=f"comma-separated, from {','.join(POLICIES)} (default: all)")
    p.add_argument("--capacities", default=None,
                   help="comma-separated capacities in experts for the sweep (default: top-k to all experts)")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="write hit rate against capacity as a PNG")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object mapping each policy to its figures")
    p.add_argument("--train-fraction", type=float, default=0.25,
                   help="the first fraction of tokens trains the score policy's frequency prior and is "
                        "not simulated, for any policy (default 0.25)")
    p.add_argument("--half-life", type=float, default=None, help="lfru's half-life in gets (default: the capacity)")
    p.add_argument("--predictor", default=None,
                   help="feed the 'predicted' policy this predictor's guesses as far ahead as it was trained "
                        "(the learned one: 4 steps; moeedge predict; needs a trace recorded with --hidden); default: none")
    p.add_argument("--model", default=None, help="the checkpoint for --predictor (default: the trace's model)")
    p.add_argument("--predictor-file", default=None, help="trained predictors for --predictor")
    t = p.add_argument_group("timing model (moeedge.sim.timing)")
    t.add_argument("--expert-bytes", default=None,
                   help="bytes of one expert (default: from the trace's model_config)")
    t.add_argument("--bandwidth", default="1.3GB",
                   help="disk read bandwidth per second (default 1.3GB: the README's cold cache reads)")
    t.add_argument("--compute-ms", type=float, default=None,
                   help="compute per expert (default: its bytes streamed at 10 GB/s, a memory-bound matvec)")
    t.add_argument("--lookahead", type=int, default=1, help="layers ahead that prefetch reads (default 1)")
    p.set_defaults(run=_cmd_sim)
    return p


def _bytes(flag: str, text: str) -> int:
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise _Usage(f"{flag}: {e}") from None
    if value <= 0:
        raise _Usage(f"{flag} must be positive, got {text!r}")
    return value


def _capacity(text: str | None, default: int, expert_bytes: int | None) -> int:
    """Experts from '16' or from a byte count such as '512MiB' (whole experts that fit)."""
    if text is None:
        return default
    if text.strip().lstrip("-").isdigit():
        n = int(text)
        if n <= 0:
            raise _Usage(f"--capacity must be positive, got {n}")
        return n
    nbytes = _bytes("--capacity", text)
    if expert_bytes is None:
        raise _Usage(f"--capacity {text!r} is in bytes but the expert size is unknown: pass --expert-bytes")
    if nbytes < expert_bytes:
        raise _Usage(f"--capacity {text!r} holds no expert of {format_bytes(expert_bytes)}")
    return nbytes // expert_bytes


def _check(args: argparse.Namespace) -> list[str]:
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise _Usage(f"--policy: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(POLICIES)}")
    if not 0 <= args.train_fraction < 1:
        raise _Usage(f"--train-fraction must be in [0, 1), got {args.train_fraction}")
    if args.lookahead < 0:
        raise _Usage(f"--lookahead must not be negative, got {args.lookahead}")
    if args.compute_ms is not None and args.compute_ms < 0:
        raise _Usage(f"--compute-ms must not be negative, got {args.compute_ms}")
    if args.half_life is not None and args.half_life <= 0:
        raise _Usage(f"--half-life must be positive, got {args.half_life}")
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise _Usage(f"--plot {args.plot}: no such directory {folder}")
    return list(dict.fromkeys(policies))


def _capacities(text: str | None, trace, per_layer: bool) -> list[int]:
    from moeedge.sim.report import default_capacities

    most = trace.n_experts if per_layer else trace.n_keys
    if text is None:
        return default_capacities(trace.top_k, most)
    try:
        caps = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise _Usage(f"--capacities: expected comma-separated whole numbers of experts, got {text!r}") from None
    if not caps or caps[0] <= 0:
        raise _Usage(f"--capacities must be positive, got {text!r}")
    return caps


def _guesses(args: argparse.Namespace, n_train: int):
    """The predictor's guesses for the simulated tokens, as many steps ahead as it was trained for."""
    from moeedge.predict.cli import build_predictor
    from moeedge.predict.metrics import guess_matrix, load_routing

    routing = load_routing(args.trace, need_hidden=True)
    predictor = build_predictor(args.predictor, args.model, args.predictor_file, routing)
    return guess_matrix(predictor, routing.tokens(n_train), predictor.max_lookahead)


def _cmd_sim(args: argparse.Namespace) -> int:
    from moeedge.sim import load_trace

    policies = _check(args)
    full = load_trace(args.trace)
    expert_bytes = _bytes("--expert-bytes", args.expert_bytes) if args.expert_bytes else full.expert_bytes
    bandwidth = _bytes("--bandwidth", args.bandwidth)
    most = full.n_experts if args.per_layer else full.n_keys
    capacity = _capacity(args.capacity, max(full.top_k, most // 4), expert_bytes)
    sweep_caps = _capacities(args.capacities, full, args.per_layer) if args.plot or args.capacities else []
    for c in [capacity] + sweep_caps:
        if c < full.step_size:
            raise _Usage(f"capacity {c} cannot hold one layer's {full.step_size} experts "
                         f"(a step's experts are resident together)")
    n_train = int(args.train_fraction * full.n_tokens)
    if n_train >= full.n_tokens:
        raise _Usage(f"{args.trace}: --train-fraction {args.train_fraction} leaves no token to simulate")

    # numba loads here, once the input is known to be good
    from moeedge.sim.report import plot, table, to_json
    from moeedge.sim.timing import Timing

    timing = None
    if expert_bytes:
        compute_s = args.compute_ms / 1e3 if args.compute_ms is not None else expert_bytes / 10e9
        timing = Timing(expert_bytes, float(bandwidth), compute_s, args.lookahead)
    trace, reports = _simulate(args, full, policies, n_train, capacity, sweep_caps, timing)
    if args.plot:
        plot(reports, args.plot, f"{os.path.basename(args.trace)}: {full.n_layers} layers x {full.n_experts} "
             f"experts, top-{full.top_k}, {trace.n_tokens} tokens", args.per_layer, expert_bytes)
    if args.json:
        print(json.dumps(to_json(reports)))
    else:
        print(table(reports, _header(args, full, trace, n_train, capacity, expert_bytes, timing)))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def _simulate(args, full, policies: list[str], n_train: int, capacity: int, sweep_caps: list[int], timing):
    """The simulated part of the trace (after the first n_train tokens) and a PolicyReport per policy."""
    from moeedge.sim.policies import frequency_prior, pick_rate, scores_from_prior, simulate
    from moeedge.sim.report import PolicyReport
    from moeedge.sim.timing import previous_token_guesses, stall_per_token

    trace = full.tokens(n_train)
    scores = scores_from_prior(trace, frequency_prior(full.tokens(0, n_train), full.n_keys))
    rates = pick_rate(full.tokens(0, n_train), full.n_keys) if n_train else None
    guesses = _guesses(args, n_train) if args.predictor and "predicted" in policies else None
    prefetch_guesses = previous_token_guesses(trace) if timing is not None else None

    def run_at(policy: str, c: int):
        return simulate(trace, policy, c, args.per_layer, scores, args.half_life, guesses, rates)

    reports = []
    for policy in policies:
        run = run_at(policy, capacity)
        r = PolicyReport(policy, run.hits, run.accesses, capacity, args.per_layer)
        if timing is not None:
            r.stall_s_per_token = {mode: stall_per_token(trace, run, timing, mode, prefetch_guesses)[0]
                                   for mode in ("none", "oracle", "predicted")}
        r.sweep = [(c, run_at(policy, c).hit_rate) for c in sweep_caps]
        reports.append(r)
    return trace, reports


def _header(args, full, trace, n_train: int, capacity: int, expert_bytes: int | None, timing) -> list[str]:
    where = "per layer" if args.per_layer else "in one cache shared by all layers"
    size = f" ({format_bytes(capacity * expert_bytes)}{' per layer' if args.per_layer else ''})" if expert_bytes else ""
    header = [f"{args.trace}: {full.n_tokens} tokens, {full.n_layers} MoE layers x {full.n_experts} experts, "
              f"top-{full.top_k}; simulated the last {trace.n_tokens} tokens ({trace.n_accesses} accesses), "
              f"the first {n_train} trained the score policy's prior",
              f"capacity {capacity} experts {where}{size}"]
    if timing is not None:
        header.append(f"timing: {format_bytes(expert_bytes)} per expert read at {timing.bandwidth / 1e9:.2f} GB/s "
                      f"({timing.read_s * 1e3:.2f} ms), {timing.compute_s * 1e3:.2f} ms compute per expert, "
                      f"prefetch {timing.lookahead} layer(s) ahead")
    else:
        header.append("timing: the expert size is unknown (pass --expert-bytes for stall times)")
    return header
