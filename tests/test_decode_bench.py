"""python -m moeedge.decode_bench: the harness's moeedge run, budgets as users write them."""
from __future__ import annotations

import json

import pytest

from moeedge import decode_bench
from moeedge.default_model import default_model_path


def test_a_budget_with_units_is_taken(capsys):
    assert decode_bench.main([str(default_model_path()), "--memory-budget", "1GiB", "--tokens", "3",
                              "--prompt-tokens", "2", "--max-context", "16"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["memory_budget"] == 2 ** 30 and record["tokens"] == 3


def test_a_bad_budget_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        decode_bench.main([str(default_model_path()), "--memory-budget", "lots"])
    assert e.value.code == 2
    assert "--memory-budget: not a byte count: 'lots'" in capsys.readouterr().err
