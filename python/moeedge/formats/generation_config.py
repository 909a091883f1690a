"""The sampling a checkpoint recommends: a Hugging Face directory's generation_config.json,
or a GGUF file's general.sampling.* metadata (llama.cpp's keys). Both are untrusted: a
field of the wrong type or out of range is ignored with a SamplingConfigWarning naming
the file and the field, so a model with an odd generation_config.json still runs (on the
defaults for that field) and the user is told why."""
from __future__ import annotations

import math
import os
import warnings

from moeedge.formats.errors import shown

GENERATION_CONFIG = "generation_config.json"

# the file's name for a field -> SamplingParams' name
HF_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}
GGUF_FIELDS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
               "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
               "general.sampling.penalty_repeat": "repeat_penalty", "general.sampling.penalty_last_n": "repeat_last_n"}


class SamplingConfigWarning(UserWarning):
    """A sampling field of a checkpoint that moeedge ignored (the message says which and why)."""


def _problem(name: str, value) -> str | None:
    """Why value cannot be SamplingParams.<name>, or None when it can."""
    integer = name in ("top_k", "repeat_last_n")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return "not an integer" if integer else "not a number"
    if not math.isfinite(value):
        return "not finite"
    ranges = {"temperature": (value >= 0, ">= 0"), "top_k": (value >= 0, ">= 0"),
              "top_p": (0 < value <= 1, "in (0, 1]"), "min_p": (0 <= value <= 1, "in [0, 1]"),
              "repeat_penalty": (value > 0, "> 0"), "repeat_last_n": (value >= 0, ">= 0")}
    ok, expected = ranges[name]
    return None if ok else f"must be {expected}"


def checked_fields(raw: dict, fields: dict[str, str], where: str) -> dict:
    """SamplingParams keyword arguments from raw[key] for each key of fields that raw sets
    (None counts as unset, as transformers writes it); bad ones ignored with a warning."""
    out = {}
    for key, name in fields.items():
        value = raw.get(key)
        if value is None:
            continue
        problem = _problem(name, value)
        if problem:
            warnings.warn(f"{where}: {key} = {shown(value)} ignored ({problem}); the default is used",
                          SamplingConfigWarning, stacklevel=3)
            continue
        out[name] = int(value) if name in ("top_k", "repeat_last_n") else float(value)
    return out


def hf_sampling(raw, path: str | os.PathLike) -> dict:
    """generation_config.json's sampling (raw: its parsed JSON). do_sample false is greedy,
    as transformers reads it; absent, the fields it sets apply over the defaults."""
    if not isinstance(raw, dict):
        warnings.warn(f"{path}: not a JSON object; ignored", SamplingConfigWarning, stacklevel=2)
        return {}
    do_sample = raw.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        warnings.warn(f"{path}: do_sample = {shown(do_sample)} ignored (not true or false)", SamplingConfigWarning,
                      stacklevel=2)
        do_sample = None
    if do_sample is False:
        return {"temperature": 0.0}
    return checked_fields(raw, HF_FIELDS, str(path))


def gguf_sampling(metadata: dict, path: str | os.PathLike) -> dict:
    """The general.sampling.* keys llama.cpp's converter writes (from the source's
    generation_config.json), those present."""
    return checked_fields(metadata, GGUF_FIELDS, f"{path}: GGUF metadata")
