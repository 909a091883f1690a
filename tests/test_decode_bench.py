"""python -m moeedge.decode_bench: the harness's moeedge run, budgets as users write them."""
from __future__ import annotations

import json

import pytest
import torch

from moeedge import decode_bench
from moeedge.default_model import default_model_path


def test_a_budget_with_units_is_taken(capsys):
    assert decode_bench.main([str(default_model_path()), "--memory-budget", "1GiB", "--tokens", "3",
                              "--prompt-tokens", "2", "--max-context", "16"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["memory_budget"] == 2 ** 30 and record["tokens"] == 3


def test_warm_measures_a_resident_model(capsys):
    """--warm reads every expert and decodes once first: the timed tokens never miss, and
    they are the tokens a cold run generates."""
    args = [str(default_model_path()), "--memory-budget", "2GiB", "--tokens", "4", "--prompt-tokens", "3",
            "--max-context", "16"]
    assert decode_bench.main([*args, "--warm"]) == 0
    warm = json.loads(capsys.readouterr().out)
    assert decode_bench.main(args) == 0
    cold = json.loads(capsys.readouterr().out)
    assert warm["warm"] and not cold["warm"]
    assert warm["hit_rate"] == 1.0 and cold["hit_rate"] < 1.0
    assert warm["generated"] == cold["generated"] and warm["routing"] == cold["routing"]


def test_a_bad_budget_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        decode_bench.main([str(default_model_path()), "--memory-budget", "lots"])
    assert e.value.code == 2
    assert "--memory-budget: not a byte count: 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize("start_token", ["named", "unnamed"])  # unnamed: T5's pad token (Switch-Base-128's config)
def test_transformers_engine_decodes_switch_as_moeedge_does(tmp_path, capsys, start_token):
    """The harness's transformers engine runs an encoder-decoder the way moeedge does (the
    prompt through the encoder, greedy from the decoder's start token): same tokens.
    bfloat16 on both sides, as the harness runs them."""
    from moeedge.harness import transformers_decode
    from tiny_switch import make_switch

    make_switch(tmp_path / "switch", dtype=torch.bfloat16)
    if start_token == "unnamed":
        config = json.loads((tmp_path / "switch" / "config.json").read_text())
        del config["decoder_start_token_id"]
        (tmp_path / "switch" / "config.json").write_text(json.dumps(config))
    args = [str(tmp_path / "switch"), "--tokens", "6", "--prompt-tokens", "5", "--max-context", "32"]
    assert transformers_decode.main(args) == 0
    theirs = json.loads(capsys.readouterr().out)
    assert decode_bench.main([*args, "--memory-budget", "1GiB"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert theirs["tokens"] == 6 and theirs["generated"] == ours["generated"]
