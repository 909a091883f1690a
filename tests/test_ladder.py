"""The variant ladder (moeedge.ladder): per-variant cache keys, a build that resumes
layer by layer, plans loaded from it (lossless equal to today's load, int8 equal to
`moeedge quantize --bits 8`), and the planner's choices."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import moeedge
import pytest
import torch
from moeedge.cli import main
from moeedge.formats.open import open_checkpoint
from moeedge.keys import ExpertKey, VariantKey, expert_key
from moeedge.ladder import pack
from moeedge.ladder.build import build_ladder
from moeedge.ladder.compose import compose
from moeedge.quantize.writer import ExpertReader, open_source, write
from tiny_checkpoints import make_decoder, make_tiny_mixtral, write_tokenizer

SMALL = {"calibration_tokens": 128, "eval_tokens": 64, "window": 64, "ranks": [8], "merge_counts": [3]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ladder(tiny, tmp_path_factory):
    out, _ = build_ladder(tiny, tmp_path_factory.mktemp("pack") / "ladder", **SMALL)
    return out


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_variant_keys_are_their_own_key_space():
    keys = {ExpertKey(3, 5).packed, VariantKey(3, 5, 1).packed, VariantKey(3, 5, 2).packed}
    assert len(keys) == 3
    assert expert_key(3, 5) == ExpertKey(3, 5).packed and expert_key(3, 5, 2) == VariantKey(3, 5, 2).packed
    for bad in [(2**16, 0, 1), (0, 2**32, 1), (0, 0, 0), (0, 0, 2**16)]:
        with pytest.raises(ValueError, match="variant key out of range"):
            _ = VariantKey(*bad).packed


@pytest.mark.slow
def test_build_resumes_after_an_interruption_without_redoing_a_layer(tiny, ladder, tmp_path):
    source_before = digest(tiny)
    done = []

    def stop_after_first(phase, layer):
        done.append((phase, layer))
        if (phase, layer) == ("build", 0):
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_ladder(tiny, out, on_layer=stop_after_first, **SMALL)
    assert list(pack.read_manifest(out)["layers"]) == ["0"]
    done.clear()
    _, manifest = build_ladder(tiny, out, on_layer=lambda phase, layer: done.append((phase, layer)), **SMALL)
    assert done == [("build", 1), ("build", 2), ("measure", 0), ("measure", 1), ("measure", 2)]
    whole = pack.read_manifest(ladder)
    assert manifest["layers"] == whole["layers"] and manifest["quality"] == whole["quality"]
    assert digest(out) == digest(ladder)  # the same files, byte for byte
    assert digest(tiny) == source_before  # the source is never written
    done.clear()
    build_ladder(tiny, out, on_layer=lambda phase, layer: done.append((phase, layer)), **SMALL)
    assert done == []  # a finished ladder is not rebuilt


def test_pack_copies_nothing_of_the_source(tiny, ladder):
    source = set(digest(tiny).values())
    assert not source & set(digest(ladder).values())
    names = {p.name for p in ladder.iterdir()}
    assert names == {pack.MANIFEST, pack.ROUTING} | {pack.layer_file(i, v) for i in range(3)
                                                      for v in ("int8", "int4", "bits6")}


def test_ladder_records_bytes_and_costs(ladder):
    m = pack.read_manifest(ladder)
    for i in range(3):
        v = m["layers"][str(i)]["variants"]
        assert v["int4"]["bytes"] < v["bits6"]["bytes"] < v["int8"]["bytes"] < v["stored"]["bytes"]
        assert 0 < v["int8"]["error"] < v["int4"]["error"]
        assert sorted(set(v["bits6"]["bits"])) == [4, 8] and sum(v["bits6"]["bits"]) == 6 * 6
        assert any(name.startswith("lowrank_r") and not x["loadable"] for name, x in v.items())
        assert any(name.startswith("merge_") and not x["loadable"] for name, x in v.items())
        q = m["quality"][str(i)]
        assert q["stored"]["kl_mean"] == 0.0 and 0 < q["int8"]["kl_mean"] < q["int4"]["kl_mean"]
    assert m["hit_curve"]["hit_rate"][-1] > m["hit_curve"]["hit_rate"][0]


def test_lossless_plan_is_todays_load(tiny, ladder):
    ids = list(range(3, 30))
    plan = {"ladder": str(ladder), "variants": ["stored"] * 3}
    with moeedge.load(tiny, memory_budget="2GiB") as today, moeedge.load(tiny, memory_budget="2GiB", plan=plan) as m:
        assert torch.equal(today.logits(ids), m.logits(ids))
        assert m.plan.expert_variants == ("stored",) * 3
        assert {**m.plan.as_dict(), "expert_variants": ()} == today.plan.as_dict()


def test_int8_plan_is_the_int8_checkpoint(tiny, ladder, tmp_path):
    ckpt = open_source(tiny)
    meta = {"format": "moeedge-groupwise", "version": 1, "group_size": 64, "bits": [[8] * 6] * 3, "quality": None}
    write(tmp_path / "q8", ckpt, ExpertReader(ckpt), [[8] * 6] * 3, 64, meta)
    ids = list(range(3, 30))
    plan = {"ladder": str(ladder), "variants": ["int8"] * 3}
    with moeedge.load(tmp_path / "q8") as q8, moeedge.load(tiny, plan=plan) as m:
        assert torch.equal(q8.logits(ids), m.logits(ids))
        assert torch.equal(q8.logits(ids[:1]), m.logits(ids[:1]))  # decode through the native kernels


def test_each_variant_is_cached_under_its_own_keys(tiny, ladder):
    plan = {"ladder": str(ladder), "variants": ["int8", "stored", "bits6"]}
    with moeedge.load(tiny, memory_budget="2GiB", plan=plan) as m:
        m.logits(list(range(3, 40)))
        resident = set(m.cache.resident_keys())
    layers = {0: lambda e: VariantKey(0, e, 1).packed, 1: lambda e: ExpertKey(1, e).packed,
              2: lambda e: VariantKey(2, e, 3).packed}
    expected = {key(e) for key in layers.values() for e in range(6)}
    assert resident and resident <= expected
    assert not resident & ({ExpertKey(0, e).packed for e in range(6)} | {ExpertKey(2, e).packed for e in range(6)})


@pytest.mark.parametrize("variants, match", [
    (["stored"] * 2, "one variant per MoE layer: 3, got 2"),
    (["stored", "int3", "stored"], "variant 'int3' cannot be loaded"),
    (["stored", "lowrank_r8", "stored"], "variant 'lowrank_r8' cannot be loaded"),
])
def test_bad_plans_are_refused(tiny, ladder, variants, match):
    with pytest.raises(ValueError, match=match):
        compose(open_checkpoint(tiny), ladder, variants)


def test_a_ladder_of_another_source_is_refused(tiny, ladder, tmp_path):
    other = tmp_path / "other"
    make_decoder(other, "mixtral", seed=6)
    write_tokenizer(other)
    with pytest.raises(ValueError, match="a ladder of another checkpoint"):
        compose(open_checkpoint(other), ladder, ["int8"] * 3)
    with pytest.raises(ValueError, match="a ladder of another checkpoint"):
        build_ladder(other, ladder, **SMALL)


def test_plan_file_errors(tiny, tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a plan file"):
        moeedge.load(tiny, plan=tmp_path / "p.json")
    with pytest.raises(ValueError, match="no such file"):
        moeedge.load(tiny, plan=tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no ladder here"):
        moeedge.load(tiny, plan={"ladder": str(tmp_path), "variants": ["int8"] * 3})


def test_plan_cli_chooses_writes_and_loads(tiny, ladder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["plan", str(tiny), "--ladder", str(ladder), "--memory-budget", "2GiB", "--json",
                 "-o", str(tmp_path / "plan.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"]["variants"] == ["stored"] * 3 and out["chosen"]["kl_sum"] == 0.0  # --max-kl 0: lossless
    assert out["frontier"] and out["frontier"][0]["kl_sum"] == 0.0
    assert json.loads((tmp_path / "plan.json").read_text())["variants"] == ["stored"] * 3
    with moeedge.load(tiny, plan=tmp_path / "plan.json") as m:
        assert m.plan.expert_variants == ("stored",) * 3
    assert main(["plan", str(tiny), "--ladder", str(ladder), "--memory-budget", "2GiB", "--max-kl", "1"]) == 0
    text = capsys.readouterr().out
    assert "chosen (--max-kl 1)" in text and "frontier at this budget" in text and "binds:" in text


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "2GiB", "--ladder", "{tmp}/none"], "no ladder there"),
    (["--memory-budget", "2GiB", "--ladder", "{ladder}", "--max-kl", "-1"], "--max-kl must be at least 0"),
    (["--memory-budget", "1MiB", "--ladder", "{ladder}"], "below the smallest workable budget"),
])
def test_plan_cli_bad_input_is_one_line_and_exit_2(tiny, ladder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = [a.format(tmp=tmp_path, ladder=ladder) for a in args]
    assert main(["plan", str(tiny), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["-o", "{tmp}/file"], "exists and is not a directory"),
    (["-o", "{tmp}/full"], "not empty and not a ladder"),
    (["--calibration-tokens", "1"], "--calibration-tokens and --window must be at least 2"),
    (["--eval-tokens", "-1"], "--eval-tokens at least 0"),
])
def test_ladder_cli_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["ladder", str(tiny), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
