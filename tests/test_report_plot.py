"""The benchmark report's plot, read from its data: engines by their own names, distinct
styles, bound lines told apart, unlimited runs not joined to the limited ones."""
from __future__ import annotations

import pytest

from moeedge.harness.report_plot import BOUND_COLOUR, plot, speed_series, split_bars, unlimited_x

MiB = 1 << 20


def record(engine, precision, limit, tok_s, bound=None):
    return {"model": "m", "engine": engine, "precision": precision, "limit_bytes": limit,
            "limit_label": "unlimited" if limit is None else f"{limit // MiB}MiB", "decode_tok_s": tok_s,
            "bound_tok_s": bound, "result": {"token_wait_s": [0.01, 0.03], "token_other_s": [0.02, 0.02]}}


RECORDS = [record(e, p, limit, 1.0 + i, bound=2.0 * (1 + i) if e == "moeedge" else None)
           for e in ("moeedge", "moeedge-lru", "llama.cpp") for p in ("bf16", "q8_0")
           for i, limit in enumerate((256 * MiB, 512 * MiB, None))]


def test_each_engine_is_labelled_by_its_own_name():
    labels = {s.label for s in speed_series(RECORDS) if s.role == "measured"}
    assert labels == {f"{e} {p}" for e in ("moeedge", "moeedge-lru", "llama.cpp") for p in ("bf16", "q8_0")}
    assert [b[0].split("\n")[0] for b in split_bars(RECORDS)] == ["moeedge"] * 6 + ["moeedge-lru"] * 6


def test_engine_and_precision_pairs_have_distinct_styles():
    measured = [s for s in speed_series(RECORDS) if s.role == "measured"]
    assert len({(s.colour, s.marker) for s in measured}) == len(measured) == 6
    by_engine = {}
    for s in measured:
        by_engine.setdefault(s.label.split()[0], set()).add(s.colour)
    assert all(len(c) == 1 for c in by_engine.values()) and len(set.union(*by_engine.values())) == 3


def test_bound_lines_are_told_apart():
    bounds = [s for s in speed_series(RECORDS) if s.role == "bound"]
    assert [s.label for s in bounds] == ["bound bf16", "bound q8_0"]
    assert len({str(s.linestyle) for s in bounds}) == 2 and {s.colour for s in bounds} == {BOUND_COLOUR}
    assert all(s.colour not in {m.colour for m in speed_series(RECORDS) if m.role != "bound"} for s in bounds)


def test_unlimited_is_not_joined_to_the_limits():
    series = speed_series(RECORDS)
    far = unlimited_x(RECORDS)
    assert far == pytest.approx(1.25 * 512)
    for s in series:
        if s.role in ("measured", "bound"):
            assert far not in s.xs and s.xs == sorted(s.xs)
        else:
            assert s.role == "unlimited" and s.xs == [far] and s.linestyle == "none"
    unlimited = [s for s in series if s.role == "unlimited"]
    assert len(unlimited) == 6 and all(s.label == "" for s in unlimited)  # the limited series' legend entry


def test_only_unlimited_runs_still_get_a_labelled_point():
    series = speed_series([record("moeedge", "bf16", None, 3.0, bound=4.0)])
    assert [(s.label, s.role, s.linestyle) for s in series][0] == ("moeedge bf16", "unlimited", "none")


def test_plot_writes_a_png_per_model(tmp_path):
    pytest.importorskip("matplotlib")
    assert [p.name for p in plot(RECORDS, tmp_path)] == ["m.png"]
