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
