"""Next-token choice: greedy, or temperature with top-k / top-p / min-p and a repetition
penalty, from a generator of the request's own. One distribution serves sampling and the
speculative acceptance rule, so both see the same filtered probabilities."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 is greedy (the other fields then
    only matter to repeat_penalty, which greedy also applies)."""

    temperature: float = 0.0
    top_k: int = 0              # 0: off
    top_p: float = 1.0          # 1: off
    min_p: float = 0.0          # 0: off; keeps tokens at least min_p x the likeliest's probability
    repeat_penalty: float = 1.0  # 1: off; llama.cpp's: logits of recent tokens / (or x, if negative) it
    repeat_last_n: int = 64     # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.repeat_penalty,
                          self.repeat_last_n)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# What llama.cpp samples with when neither the user nor the model says otherwise.
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
                      "repeat_last_n": 64}


def resolve_sampling(defaults: dict, **given) -> SamplingParams:
    """SamplingParams from given (a value of None: the default's), defaults over llama.cpp's."""
    merged = {**LLAMA_CPP_DEFAULTS, **defaults}
    merged.update({name: value for name, value in given.items() if value is not None})
    return SamplingParams(**merged)


def validate_sampling(temperature: float, top_p: float, top_k: int, min_p: float = 0.0,
                      repeat_penalty: float = 1.0, repeat_last_n: int = 64) -> None:
    """A ValueError naming the first bad value (NaN fails every check)."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not (repeat_penalty > 0 and math.isfinite(repeat_penalty)):
        raise ValueError(f"repeat_penalty must be a finite number > 0, got {repeat_penalty}")
    if isinstance(repeat_last_n, bool) or not isinstance(repeat_last_n, int) or repeat_last_n < 0:
        raise ValueError(f"repeat_last_n must be an integer >= 0, got {repeat_last_n}")


def penalized(logits: torch.Tensor, params: SamplingParams, history: Sequence[int]) -> torch.Tensor:
    """logits [V] (float32) with the repetition penalty applied over the last repeat_last_n of history."""
    logits = logits.float()
    if params.repeat_penalty == 1.0 or params.repeat_last_n == 0 or not history:
        return logits
    recent = torch.tensor(sorted(set(history[-params.repeat_last_n:])), dtype=torch.long)
    recent = recent[(recent >= 0) & (recent < logits.shape[-1])]
    seen = logits[recent]
    logits = logits.clone()
    logits[recent] = torch.where(seen > 0, seen / params.repeat_penalty, seen * params.repeat_penalty)
    return logits


def distribution(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = ()) -> torch.Tensor:
    """The probabilities [V] a token is drawn from; greedy is one-hot on the argmax."""
    logits = penalized(logits, params, history)
    if params.greedy:
        return torch.zeros_like(logits).scatter_(0, torch.argmax(logits).view(1), 1.0)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


class Sampler:
    """A request's sampling: its parameters and its own generator, so seed reproduces it
    whatever else runs in the process."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def draw(self, probs: torch.Tensor) -> int:
        """One token from a distribution [V]."""
        if self.params.greedy:
            return int(torch.argmax(probs))
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        """A number in [0, 1) from this request's generator (speculative acceptance)."""
        return float(torch.rand((), generator=self.generator))

    def choose(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits [V] -> token id."""
        if self.params.greedy and self.params.repeat_penalty == 1.0:
            return int(torch.argmax(logits))
        return self.draw(distribution(logits, self.params, history))


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | None) -> int:
    """logits [V] -> token id (one draw; Sampler keeps a request's state)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(distribution(logits, params), 1, generator=generator))
