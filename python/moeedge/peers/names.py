"""What peers call things: a model's identity, and hivemind uids for its layers and experts."""
from __future__ import annotations

import hashlib
import os

from moeedge.formats.checkpoint import Checkpoint
from moeedge.keys import ExpertKey

# rpc_info's uid for "what do you hold" (and, padded, the bandwidth probe)
INFO_UID = "moeedge"
# Bytes of each expert hashed into the model's identity: a peer and a client agree on a
# model when its layout and these samples agree (a different checkpoint of the same shape
# differs in its bytes).
SAMPLE_BYTES = 256


def model_id(ckpt: Checkpoint) -> str:
    """'moeedge-' and 12 hex digits naming this checkpoint's experts: their byte layout and a
    sample of each one's bytes."""
    h = hashlib.sha256()
    h.update(repr(sorted((k, [(os.path.getsize(ckpt.files[f]), o, n) for f, o, n in r])
                         for k, r in ckpt.expert_ranges.items())).encode())
    for key in sorted(ckpt.expert_ranges):
        f, offset, length = ckpt.expert_ranges[key][0]
        with open(ckpt.files[f], "rb") as fh:
            fh.seek(offset)
            h.update(fh.read(min(length, SAMPLE_BYTES)))
    return "moeedge-" + h.hexdigest()[:12]


def layer_uid(model: str, moe_layer: int) -> str:
    return f"{model}.{moe_layer}"


def expert_uid(model: str, moe_layer: int, expert: int) -> str:
    return f"{model}.{moe_layer}.{expert}"


def held_keys(holdings: dict[int, list[int]]) -> list[int]:
    return [ExpertKey(layer, e).packed for layer, experts in sorted(holdings.items()) for e in experts]
