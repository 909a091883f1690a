"""One MoE layer and one decode step of the bundled default model, resident: the Python
and kernel cost of a token when no expert has to be read (`pytest bench/test_bench_decode.py`).
Each case checks its output against the same computation done once before timing."""
from __future__ import annotations

import pytest
import torch

import moeedge
from moeedge.decode_bench import prompt_ids


@pytest.fixture(scope="module")
def model():
    with moeedge.load(predictor=None) as m:  # the default model; the whole of it fits
        ids = prompt_ids(m.config.vocab, 16)
        list(m.stream_ids(ids, max_new_tokens=4, temperature=0))  # every expert this prompt routes to is resident
        yield m, ids


def test_moe_layer_one_token(benchmark, model):
    m, _ = model
    runner = m.runner
    layer = next(iter(runner.moe_index))
    x = torch.randn(1, m.config.hidden, generator=torch.Generator().manual_seed(0))
    expected = runner._moe(x, layer)
    benchmark.group = "default_model"
    out = benchmark(runner._moe, x, layer)
    assert torch.equal(out, expected)
    benchmark.extra_info["hit_rate"] = m.stats()["hit_rate"]


def test_decode_step(benchmark, model):
    """One token's forward after a 16-token prompt: every call writes position 16 of the KV cache again."""
    m, ids = model
    m.logits(torch.tensor(ids))  # the prompt's keys and values
    token = torch.tensor([ids[-1]])

    def step() -> torch.Tensor:
        m.runner.truncate(m.sequence, len(ids))
        return m.runner.step([(m.sequence, token)])[0]

    expected = step()
    benchmark.group = "default_model"
    out = benchmark(step)
    assert torch.equal(out, expected)
    benchmark.extra_info["tokens_per_s"] = 1 / benchmark.stats["median"]
