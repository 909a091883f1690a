"""`moeedge serve-experts`: hold a share of a model's experts for other devices."""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal

from moeedge.units import format_bytes


def is_loopback(maddr: str) -> bool:
    """Whether a multiaddr listens on loopback only (/ip4/127.x or /ip6/::1)."""
    parts = maddr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        raise ValueError(f"--listen {maddr!r}: expected a multiaddr such as /ip4/127.0.0.1/tcp/0")
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        raise ValueError(f"--listen {maddr!r}: {parts[2]!r} is not an IP address") from None


def _cmd_serve_experts(args: argparse.Namespace) -> int:
    from moeedge.peers import require_hivemind

    require_hivemind()
    from moeedge.peers.server import ExpertServer, PeerOptions

    if not is_loopback(args.listen) and not args.allow and not args.allow_any:
        raise ValueError(f"--listen {args.listen} is not loopback: name the callers with --allow PEER_ID "
                         "(or pass --allow-any to let any peer on the network call this one)")
    if args.skip_most_used < 0:
        raise ValueError(f"--skip-most-used must be >= 0, got {args.skip_most_used}")
    if args.max_rows < 1:
        raise ValueError(f"--max-rows must be at least 1, got {args.max_rows}")
    options = PeerOptions(memory_budget=args.memory_budget, experts=args.experts, listen=args.listen,
                          initial_peers=tuple(args.initial_peers), identity=args.identity,
                          allow=frozenset(args.allow) if args.allow else None, trace=args.trace,
                          max_rows=args.max_rows, skip_most_used=args.skip_most_used)
    server = ExpertServer(args.source, options)
    # SIGTERM and Ctrl-C end the wait below, and the finally clause ends hivemind's processes
    # (an exception raised inside a signal handler can land in the middle of their shutdown).
    # hivemind's forked helpers inherit the handler: there, the signal does what it did before.
    main_pid = os.getpid()

    def on_signal(sig, frame):
        if os.getpid() == main_pid:
            server.stop()
        else:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        server.start()
        held = sum(len(v) for v in server.held.values())
        m = server.memory()
        print(f"serving {held} of {server.n_layers * server.n_experts} experts of {server.model} "
              f"({format_bytes(m['expert_bytes'])}); process {format_bytes(m['process_bytes'])}, "
              f"{m['helper_processes']} helper processes {format_bytes(m['forked_helpers_bytes'])} "
              f"+ p2pd {format_bytes(m['daemon_bytes'])}; budget {format_bytes(m['budget_bytes'])}", flush=True)
        for layer, experts in server.held.items():
            print(f"  MoE layer {layer}: experts {','.join(map(str, experts))}", flush=True)
        for address in server.addresses:
            print(address, flush=True)
        server.wait()
    finally:
        server.shutdown()
    return 0


def peer_id_of(path: str) -> str:
    """The peer id of the key file at path, made first if missing."""
    from moeedge.peers import require_hivemind

    require_hivemind()
    from hivemind.p2p import P2P, PeerID

    if not os.path.exists(path):
        P2P.generate_identity(path)
    try:
        with open(path, "rb") as f:
            return PeerID.from_identity(f.read()).to_base58()
    except Exception as e:  # noqa: BLE001 (a file that is not a key)
        raise ValueError(f"{path}: not a peer key file ({type(e).__name__})") from None


def _cmd_peer_id(args: argparse.Namespace) -> int:
    print(peer_id_of(args.path))
    return 0


def add_peer_client_options(p: argparse.ArgumentParser) -> None:
    """--peer, --peer-deadline, --peer-identity: for the commands that load a model (run, chat, serve)."""
    p.add_argument("--peer", action="append", default=None, metavar="MULTIADDR",
                   help="a `moeedge serve-experts` peer's address, repeatable: it computes experts it holds "
                        "where that is faster than reading them (needs moeedge[peers]; docs/peers.md)")
    p.add_argument("--peer-deadline", type=float, default=1.0,
                   help="seconds a peer's call may take before its experts are computed here (default 1)")
    p.add_argument("--peer-identity", default=None, metavar="PATH",
                   help="this client's key file (made if missing), so peers can --allow it (moeedge peer-id PATH)")


def add_peer_parsers(sub) -> None:
    p = sub.add_parser("peer-id", help="the peer id of a key file (made if missing), for --allow")
    p.add_argument("path")
    p.set_defaults(run=_cmd_peer_id)
    add_serve_experts_parser(sub)


def add_serve_experts_parser(sub) -> None:
    p = sub.add_parser("serve-experts", help="hold a share of a model's experts for other devices (peers)")
    p.add_argument("source", nargs="?", default=None,
                   help="Hugging Face checkpoint directory or .gguf file (default: the bundled model)")
    p.add_argument("--memory-budget", default="auto",
                   help="memory this peer may use in all, its hivemind processes and p2pd included (default auto)")
    p.add_argument("--experts", nargs="+", default=["auto"], metavar="auto|LAYER:E,E,...",
                   help="experts to hold: auto (most used first that fit, skipping those other peers hold) "
                        "or MoE layer:experts, e.g. 0:1,2 3:5")
    p.add_argument("--trace", default=None, help="routing trace (moeedge trace) whose use orders --experts auto")
    p.add_argument("--skip-most-used", type=int, default=0, metavar="N",
                   help="--experts auto leaves the N most used experts to the client, which caches them itself")
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0",
                   help="multiaddr to listen on (default loopback, any port)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                   help="other peers' addresses, to join their DHT")
    p.add_argument("--identity", default=None,
                   help="private key file: the same peer id every start (made if missing)")
    p.add_argument("--allow", nargs="*", default=None, metavar="PEER_ID",
                   help="only these callers (peer ids) may call this peer")
    p.add_argument("--allow-any", action="store_true",
                   help="let any caller in, also on a non-loopback --listen")
    p.add_argument("--max-rows", type=int, default=64, help="hidden-state rows per request at most (default 64)")
    p.set_defaults(run=_cmd_serve_experts)
