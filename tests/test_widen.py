"""python -m moeedge.widen: bigger experts, the same model."""
from __future__ import annotations

import json

import torch
from tiny_checkpoints import make_decoder, write_tokenizer

import moeedge
from moeedge.widen import main, widen_expert, widened_intermediate

IDS = [1, 17, 42, 99, 5, 63, 120, 7, 88, 31]


def test_a_widened_expert_computes_the_same():
    g = torch.Generator().manual_seed(0)
    w1, w3, w2 = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    x = torch.randn(5, 32, generator=g)
    v1, v3, v2 = widen_expert(w1, w3, w2, 48 + 2 * 40, g)
    assert v1.shape == (128, 32) and v2.shape == (32, 128)
    assert (v1 != 0).all() and (v2 != 0).all()  # no zero pages
    ffn = lambda a, b, c: (torch.nn.functional.silu(x @ a.T) * (x @ b.T)) @ c.T  # noqa: E731
    torch.testing.assert_close(ffn(v1, v3, v2), ffn(w1, w3, w2), atol=1e-4, rtol=1e-4)


def test_widened_checkpoint_keeps_outputs_and_grows_experts(tmp_path):
    source = tmp_path / "src"
    make_decoder(source, "mixtral", seed=1, dtype=torch.bfloat16)
    write_tokenizer(source)
    wide = widened_intermediate(64, 96, 256 * 1024, 2)
    assert wide % 64 in (0, 1) and wide >= 96
    assert main([str(source), "--expert-bytes", "256KiB", "-o", str(tmp_path / "wide")]) == 0
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["intermediate_size"] == wide
    with moeedge.load(source) as model:
        expected = model.logits(IDS)
        small = model.checkpoint.expert_nbytes
    with moeedge.load(tmp_path / "wide") as model:
        got = model.logits(IDS)
        assert model.checkpoint.expert_nbytes == small * wide // 96
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_refuses_what_it_cannot_do(tmp_path, capsys):
    source = tmp_path / "src"
    make_decoder(source, "mixtral", seed=1, dtype=torch.bfloat16)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([str(source), "--expert-bytes", "1MiB", "-o", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert main([str(source), "--expert-bytes", "900TB", "-o", str(tmp_path / "huge")]) == 2
    assert "more than half of the" in capsys.readouterr().err
    assert not (tmp_path / "huge").exists()
    assert main([str(source), "--expert-bytes", "lots", "-o", str(tmp_path / "bad")]) == 2
    assert "not a byte count: 'lots'" in capsys.readouterr().err


def test_a_merged_draft_is_widened_like_its_model(tmp_path):
    from moeedge.aggregate.pipeline import aggregate

    source = tmp_path / "src"
    make_decoder(source, "mixtral", seed=1, dtype=torch.float32)
    write_tokenizer(source)
    aggregate(source, "merge", tmp_path / "draft", experts_per_layer=1, calibration_tokens=128, eval_tokens=0)
    assert main([str(tmp_path / "draft"), "--expert-bytes", "256KiB", "-o", str(tmp_path / "wide")]) == 0
    assert (tmp_path / "wide" / "moeedge_variant.json").is_file()
    with moeedge.load(tmp_path / "draft") as model:
        expected = model.logits(IDS)
    with moeedge.load(tmp_path / "wide") as model:
        assert len(model.cache.store.keys()) == 3  # one expert per MoE layer
        got = model.logits(IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
