"""How speculative decoding picks k (moeedge.spec_choice.KChooser) from measured acceptance and costs."""
from __future__ import annotations

import random

import pytest

from moeedge.spec_choice import PROBE, KChooser, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def run(chooser: KChooser, plain: float, draft: float, verify, accept: float, steps: int = 400) -> list[int]:
    """Feed a chooser the costs of a simulated run (each drafted token kept with chance accept
    until the first rejection, from a seeded generator); the k it picked each step."""
    rng, ks = random.Random(0), []
    for _ in range(steps):
        k = chooser.choose()
        ks.append(k)
        if k == 0:
            chooser.observe_plain(plain)
        else:
            kept = 0
            while kept < k and rng.random() < accept:
                kept += 1
            chooser.observe_round(k, kept, draft * k, verify(k + 1))
    return ks


def test_it_drafts_when_verifying_is_cheap_and_drafts_are_kept():
    ks = run(KChooser(6), plain=1.0, draft=0.05, verify=lambda n: 1.0 + 0.1 * n, accept=0.9)
    assert ks[0] == 0 and min(ks[10:]) >= 3  # one plain step to measure, then drafting, and more


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
