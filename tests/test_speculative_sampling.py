"""The speculative sampling rule (moeedge.speculative.accept) keeps the full model's distribution:
on a five-token vocabulary, with the filters of runtime/sampling.py's distribution() applied
to both models, the tokens a round emits are distributed as the full model's own draws
(chi-square, fixed seeds: deterministic, and far from the threshold either way); a naive
rule that keeps every draft fails the same test. And with a tiny model end to end:
seeded speculative sampling is reproducible at a fixed k."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import moeedge
from moeedge.aggregate.pipeline import aggregate
from moeedge.runtime.sampling import Sampler, SamplingParams, distribution
from moeedge.speculative import accept
from tiny_checkpoints import make_decoder, write_tokenizer

V, TRIALS = 5, 10000


def rows(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 1.5


def emitted(params: SamplingParams, rule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts of the first and second token of TRIALS rounds of k=2, and their expected probabilities."""
    sampler = Sampler(params)
    p = [distribution(r, params) for r in rows(1, 3)]  # the full model's, the same whatever came before
    q = [distribution(r, params) for r in rows(2, 2)]  # the draft's
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(TRIALS):
        drafted = [sampler.draw(q[0]), sampler.draw(q[1])]
        out = rule(lambda i: p[i], q, drafted, sampler)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    return first, p[0], second, p[1]


def keep_all(target, dists, drafted, sampler):
    return drafted + [sampler.draw(target(len(drafted)))]


def fits(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the filters rule out was emitted"
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum()
    return float(chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=0),
                                    SamplingParams(temperature=0.7, top_k=4, seed=1),
                                    SamplingParams(temperature=1.3, top_p=0.9, min_p=0.05, seed=2)])
def test_emitted_tokens_follow_the_full_model(params):
    first, p0, second, p1 = emitted(params, accept)
    assert fits(first, p0) > 1e-3
    assert second.sum() > TRIALS / 4
    assert fits(second, p1) > 1e-3


def test_the_test_catches_a_wrong_rule():
    first, p0, _, _ = emitted(SamplingParams(temperature=1.0, seed=0), keep_all)
    assert fits(first, p0) < 1e-6


def test_greedy_rounds_keep_exactly_the_argmax():
    params = SamplingParams(temperature=0.0)
    p = [distribution(r, params) for r in rows(3, 3)]
    best = [int(torch.argmax(x)) for x in p]
    q = [torch.nn.functional.one_hot(torch.tensor(t), V).float() for t in (best[0], (best[1] + 1) % V)]
    assert accept(lambda i: p[i], q, [best[0], (best[1] + 1) % V], Sampler(params)) == best[:2]


def test_seeded_speculative_sampling_is_reproducible(tmp_path):
    make_decoder(tmp_path / "m", "mixtral", seed=3)
    write_tokenizer(tmp_path / "m")
    aggregate(tmp_path / "m", "merge", tmp_path / "d", experts_per_layer=1, calibration_tokens=128, eval_tokens=0)
    prompt = list(range(3, 15))
    runs = []
    for _ in range(2):
        with moeedge.load(tmp_path / "m", memory_budget="1GiB", max_context=64, draft=tmp_path / "d") as model:
            model.speculator.chooser.fixed = 3  # an adapting k follows timings, and the draws with it
            runs.append(list(model.stream_ids(prompt, 20, temperature=0.9, top_k=30, seed=7)))
            assert model.stats()["speculative"]["rounds"] > 0
    assert runs[0] == runs[1] and len(runs[0]) > 0 and all(0 <= t < 160 for t in runs[0])
