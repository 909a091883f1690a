"""The bundled default model: it ships in the package, loads with no source, computes
what transformers computes, and writes Python-looking text."""
from __future__ import annotations

import json

import pytest
import torch

import moeedge
from moeedge.cli import main
from moeedge.default_model import BUNDLED, default_model_path


def test_it_ships_in_the_package_within_20_mb():
    assert default_model_path() == BUNDLED
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.model", "README.md", "moeedge_predictor.safetensors"):
        assert name in files, name
    assert sum(files.values()) <= 20 * 10**6
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("mixtral", 8, 2)


def test_load_with_no_source_matches_transformers():
    transformers = pytest.importorskip("transformers")
    reference = transformers.MixtralForCausalLM.from_pretrained(BUNDLED, dtype=torch.bfloat16).eval()
    with moeedge.load() as model:
        ids = model.tokenizer.encode("import os\n\n\ndef read_lines(path):\n")
        got = model.logits(ids)
        stats = model.stats()
    with torch.no_grad():
        # transformers on bf16 weights in fp32 activations: what moeedge computes
        expected = reference.float()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    assert stats["prediction"]["predictor"] == "learned" and stats["policy"] == "predicted"


def test_cli_runs_it_with_no_source(capsys):
    assert main(["run", "--prompt", "def main():\n", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip()) > 0
