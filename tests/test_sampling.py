"""Sampling: greedy, temperature, top-k and top-p, reproducible with a seed."""
import pytest
import torch

from moeedge.runtime.sampling import sample, validate_sampling

LOGITS = torch.tensor([0.1, 2.0, 1.5, -1.0, 0.7])


def draws(n=200, **kw):
    gen = torch.Generator().manual_seed(kw.pop("seed", 0))
    return [sample(LOGITS, generator=gen, **kw) for _ in range(n)]


def test_temperature_zero_is_argmax():
    assert sample(LOGITS, 0.0, 1.0, 0, None) == 1


def test_top_k_one_is_argmax_at_any_temperature():
    assert set(draws(temperature=5.0, top_p=1.0, top_k=1)) == {1}


def test_top_k_limits_the_choices():
    assert set(draws(temperature=5.0, top_p=1.0, top_k=2)) == {1, 2}


def test_top_p_keeps_the_smallest_nucleus():
    # softmax(LOGITS): token 1 ~0.46, token 2 ~0.28: p=0.5 keeps exactly those two
    assert set(draws(temperature=1.0, top_p=0.5, top_k=0)) == {1, 2}


def test_same_seed_same_tokens_other_seed_other_tokens():
    a = draws(temperature=1.0, top_p=1.0, top_k=0, seed=3)
    assert a == draws(temperature=1.0, top_p=1.0, top_k=0, seed=3)
    assert a != draws(temperature=1.0, top_p=1.0, top_k=0, seed=4)


@pytest.mark.parametrize("temperature, top_p, top_k, message", [
    (-0.1, 1.0, 0, "temperature"), (float("nan"), 1.0, 0, "temperature"),
    (1.0, 0.0, 0, "top_p"), (1.0, 1.5, 0, "top_p"), (1.0, 1.0, -1, "top_k"),
])
def test_bad_values_are_refused(temperature, top_p, top_k, message):
    with pytest.raises(ValueError, match=message):
        validate_sampling(temperature, top_p, top_k)


def test_min_p_drops_the_unlikely():
    from moeedge.runtime.sampling import SamplingParams, distribution
    # softmax(LOGITS) max ~0.46; min_p 0.5 keeps tokens >= 0.23: tokens 1 and 2
    probs = distribution(LOGITS, SamplingParams(temperature=1.0, min_p=0.5))
    assert set(torch.nonzero(probs).flatten().tolist()) == {1, 2}
    assert float(probs.sum()) == pytest.approx(1.0)


def test_repeat_penalty_moves_greedy_off_a_recent_token():
    from moeedge.runtime.sampling import Sampler, SamplingParams
    assert Sampler(SamplingParams()).choose(LOGITS, history=[1]) == 1
    # 2.0 / 1.5 = 1.33 < 1.5: token 2 wins once token 1 is recent; a negative logit grows more negative
    assert Sampler(SamplingParams(repeat_penalty=1.5)).choose(LOGITS, history=[1]) == 2
    assert Sampler(SamplingParams(repeat_penalty=1.5, repeat_last_n=1)).choose(LOGITS, history=[1, 0]) == 1


@pytest.mark.parametrize("field, value", [
    ("min_p", -0.1), ("min_p", 1.5), ("repeat_penalty", 0.0), ("repeat_penalty", float("inf")),
    ("repeat_last_n", -1), ("top_k", 1.5), ("temperature", float("inf")),
])
def test_bad_sampling_params_are_refused(field, value):
    from moeedge.runtime.sampling import SamplingParams
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_sampler_reproduces_its_seed_whatever_else_draws():
    from moeedge.runtime.sampling import Sampler, SamplingParams
    params = SamplingParams(temperature=1.0, seed=7)
    alone = [Sampler(params).choose(LOGITS) for _ in range(1)]
    a, b = Sampler(params), Sampler(SamplingParams(temperature=1.0, seed=8))
    mixed = []
    for _ in range(20):
        mixed.append(a.choose(LOGITS))
        b.choose(LOGITS)
    fresh = Sampler(params)
    assert mixed == [fresh.choose(LOGITS) for _ in range(20)] and mixed[:1] == alone
