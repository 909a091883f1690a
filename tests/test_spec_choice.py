"""How speculative decoding picks k (moeedge.spec_choice.KChooser) from measured acceptance and costs."""
from __future__ import annotations

import random

import pytest

from moeedge.spec_choice import ALLOW, PROBE, KChooser, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def run(chooser: KChooser, plain: float, draft: float, verify, accept: float, steps: int = 400,
        switch: float = 0.0, tokens: int | None = None) -> list[int]:
    """Feed a chooser the costs of a simulated run (each drafted token kept with chance accept
    until the first rejection, from a seeded generator; a round after plain steps pays `switch`
    seconds more); the k it picked each step, until `steps` steps or `tokens` tokens."""
    rng, ks, made, last = random.Random(0), [], 0, 0
    while len(ks) < steps and (tokens is None or made < tokens):
        k = chooser.choose()
        ks.append(k)
        if k == 0:
            chooser.switch_cost = 2 * switch  # as the speculator sets it when the draft lends its bytes
            chooser.observe_plain(plain)
            made += 1
        else:
            kept = 0
            while kept < k and rng.random() < accept:
                kept += 1
            extra = switch if last == 0 else 0.0
            chooser.observe_round(k, kept, draft * k, verify(k + 1), draft * k + verify(k + 1) + extra)
            made += kept + 1
        last = k
    return ks


def seconds(ks: list[int], plain: float, draft: float, verify, switch: float = 0.0) -> float:
    """What a simulated run's choices cost (the drafted rounds' tokens as run() drew them)."""
    return sum(plain if k == 0 else draft * k + verify(k + 1) + (switch if i and ks[i - 1] == 0 else 0.0)
               for i, k in enumerate(ks))


def test_it_drafts_when_verifying_is_cheap_and_drafts_are_kept():
    ks = run(KChooser(6), plain=1.0, draft=0.05, verify=lambda n: 1.0 + 0.1 * n, accept=0.9)
    first = next(i for i, k in enumerate(ks) if k)  # plain steps measure c_1, a round is afforded, then more
    assert ks[first] == 1 and first < 40 and min(ks[first + 3:]) >= 3


def test_it_turns_itself_off_and_probes_ever_more_rarely():
    # a verify pass of n tokens costs n plain steps: drafting cannot pay
    ks = run(KChooser(6), plain=1.0, draft=0.3, verify=lambda n: float(n), accept=0.9, steps=2000)
    probes = [i for i, k in enumerate(ks) if k > 0]
    assert len(probes) < 10 and ks[-PROBE:] == [0] * PROBE
    gaps = [b - a for a, b in zip(probes[1:], probes[2:])]
    assert gaps == sorted(gaps) and gaps[-1] > 4 * PROBE


def test_a_fixed_k_is_used_whatever_is_measured():
    chooser = KChooser(6)
    chooser.fixed = 2
    assert set(run(chooser, plain=1.0, draft=1.0, verify=lambda n: 9.0, accept=0.0)) == {2}


def test_bad_k_max():
    with pytest.raises(ValueError, match="k_max must be from 1 to 16"):
        KChooser(0)


@pytest.mark.parametrize("switch", [0.0, 1.0])  # resident; under a limit, the draft's experts read back
@pytest.mark.parametrize("n", [16, 64, 256])
def test_where_drafting_does_not_pay_a_short_run_loses_at_most_a_few_percent(n, switch):
    """64 tokens where every round loses (verify passes as dear as their tokens' plain steps,
    and under a limit a switch of a plain step's time): within 5% of plain decoding's time."""
    verify = lambda m: 1.2 * m  # noqa: E731
    chooser = KChooser(6)
    ks = run(chooser, plain=1.0, draft=0.3, verify=verify, accept=0.7, steps=10 ** 6, switch=switch, tokens=n)
    made = chooser.tokens
    assert made >= n
    worst = 0.3 + verify(2) + switch - 1.0  # a first round of one draft, all rejected
    assert seconds(ks, 1.0, 0.3, verify, switch) <= (1.0 + ALLOW) * made + worst
    assert seconds(ks, 1.0, 0.3, verify, switch) <= 1.05 * made or n < 64


def test_a_paying_run_keeps_drafting_and_its_gain_pays_for_probes():
    chooser = KChooser(6)
    ks = run(chooser, plain=1.0, draft=0.05, verify=lambda m: 1.0 + 0.05 * m, accept=0.8, steps=200)
    assert chooser.loss < 0 and sum(k > 0 for k in ks[-50:]) == 50
