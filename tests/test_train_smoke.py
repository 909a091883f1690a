"""The default model's training pipeline, end to end at toy size: a few steps on a few
stdlib files write a directory moeedge.load reads, and a run stopped mid-way resumes
to the same bytes as one that was never stopped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

import moeedge  # noqa: E402
from moeedge.tokenizer import Tokenizer  # noqa: E402
from moeedge.train.default_model import TrainConfig, decay_start, lr_at, main, steps_if_decaying_after, train  # noqa: E402, I001

DENSE_STEPS, MOE_STEPS = 3, 3


def tiny(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out=out, hidden=32, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=4, top_k=2, intermediate=48,
                       vocab=512, seq_len=32, batch=4, dense_steps=DENSE_STEPS, moe_steps=MOE_STEPS, limit_files=4,
                       eval_tokens=512, threads=1, **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("straight")
    return out, train(tiny(out))


def test_run_writes_a_checkpoint_moeedge_loads(straight):
    out, record = straight
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "README.md",
            "training.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "train_state").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["dtype"], config["num_local_experts"]) == ("mixtral", "bfloat16", 4)
    with moeedge.load(out, max_context=64) as model:
        assert model.logits([1, 5, 6, 7]).shape == (4, 512)
        assert isinstance(model.generate("def f(x):\n", max_new_tokens=4, temperature=0), str)
    assert record["figures"]["moeedge"]["max_abs_logit_diff"] < 1e-3
    assert record["corpus"]["held_out_packages"] == ["asyncio", "email"]
    assert {f["split"] for f in record["corpus"]["files"]} == {"train", "heldout"}
    readme = (out / "README.md").read_text()
    assert f"{record['figures']['perplexity']['moe']:.2f}" in readme and "Routing predictability" in readme


def test_tokenizer_round_trips_code(straight):
    out, _ = straight
    tok = Tokenizer({n: str(out / n) for n in ("tokenizer.model", "tokenizer_config.json")})
    text = "class A:\n\tdef f(self):  \n        return 'é ✓ 😀'  # ünïcode\r\n\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 1 and tok.eos_ids == [2]
    assert tok.decode(ids) == text
    assert tok.render_chat([{"role": "user", "content": "read a file\nthen print it"}]) == \
        "<s># read a file\n# then print it\n"


def test_resume_continues_to_the_same_weights(straight, tmp_path):
    out, _ = straight
    for stop in (2, DENSE_STEPS + 1):  # once inside the dense phase, once inside the MoE phase
        assert train(tiny(tmp_path, stop_after=stop, resume=stop != 2)) is None
        assert (tmp_path / "train_state" / "state.pt").is_file() and not (tmp_path / "config.json").exists()
    with pytest.raises(SystemExit, match="--resume"):
        train(tiny(tmp_path))
    record = train(tiny(tmp_path, resume=True))
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert [e["step"] for e in record["log"]] == [DENSE_STEPS, DENSE_STEPS + MOE_STEPS]
    assert train(tiny(tmp_path, resume=True))["figures"] == record["figures"]  # done: nothing to resume


def test_cli_wants_both_step_counts(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--dense-steps", "3"])


def test_fixing_a_phase_length_never_changes_the_steps_already_taken():
    cfg = TrainConfig(out=Path("."))
    for done in range(1, 400):
        n = steps_if_decaying_after(done, cfg)
        assert decay_start(n, cfg) >= done
        assert all(lr_at(s, None, 1e-3, 50, cfg) == lr_at(s, n, 1e-3, 50, cfg) for s in range(done))
        assert lr_at(n - 1, n, 1e-3, 50, cfg) == cfg.min_lr
