"""The peer tier: experts held and computed by other devices, over hivemind (libp2p).

serve-experts (moeedge.peers.server) holds a share of a model's experts and computes them
with moeedge's own kernels; a client (moeedge.peers.remote, through moeedge.load(peers=...))
sends a token's hidden state to the peer that holds an expert instead of reading the expert
from disk, when the measured costs (moeedge.peers.cost) say it is faster. hivemind is an
optional extra: every import of it is lazy, so that the base install works without it."""
from __future__ import annotations

INSTALL_HINT = 'pip install "moeedge[peers]"'


class PeersUnavailable(ValueError):
    """hivemind is not installed (a ValueError: the CLI reports it in one line, exit 2)."""


def require_hivemind():
    """The hivemind module, or PeersUnavailable saying how to install it."""
    import os

    # hivemind shares its task pools' batches through files (torch's "file_system"), which
    # starts torch_shm_manager, a program that holds about 50 MB of its own: passing file
    # descriptors (torch's default on Linux) needs no helper.
    os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")
    try:
        import hivemind
    except ImportError as e:
        raise PeersUnavailable(f"peers need hivemind ({e.name or 'hivemind'} is missing): {INSTALL_HINT}") from None
    import logging

    # hivemind logs every start and request at INFO; a peer's own lines say what matters
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    return hivemind
