"""A prompt's feed-forward products take the prompt kernels (moeedge.kernels.PROMPT_QUANTS:
the K-quants with x rounded per 256 values), a decode step's never: a decode step must keep
the one-token kernels' bits in any batch (test_batch_invariance.py), a prompt's result only
has to depend on the prompt."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import gguf_fixtures as gf
import moeedge
from moeedge.kernels import PROMPT_QUANTS
from moeedge.models import decoder_ffn


@pytest.fixture
def calls(monkeypatch):
    """prompt, of every feed-forward product on K-quant weights the decoder makes (the
    router's, on F32 weights, has no prompt kernel)."""
    seen = []
    real = decoder_ffn.linear

    def spy(x, w, bias=None, prompt=False):
        if getattr(w, "quant", None) in PROMPT_QUANTS:
            seen.append(prompt)
        return real(x, w, bias, prompt)
    monkeypatch.setattr(decoder_ffn, "linear", spy)
    return seen


def test_the_prompt_takes_the_prompt_kernels_and_decoding_does_not(tmp_path, calls):
    path, _ = gf.quantized_mixtral(tmp_path, "q4_k")
    with moeedge.load(path, memory_budget="8GiB") as model:
        ids = torch.randint(0, gf.KQUANT_MIXTRAL["vocab"], (12,), generator=torch.Generator().manual_seed(0)).tolist()
        stream = model.stream_ids(ids, max_new_tokens=4, temperature=0)
        next(stream)  # the prompt, then its first token
        prompt, calls[:] = list(calls), []
        rest = list(stream)
        assert not model.runner.in_prompt
    assert prompt and all(prompt), "every expert product of the prompt's 12 rows"
    assert len(rest) == 3
    assert not any(calls), "a decode step takes the decode kernels"


def test_the_prompt_kernels_keep_the_model_close_to_its_dequantized_twin(tmp_path):
    """Logits after a prompt, as test_gguf.py's kernels check them against the F32 twin."""
    path, dequantized = gf.quantized_mixtral(tmp_path, "q4_k")
    ids = torch.randint(0, gf.KQUANT_MIXTRAL["vocab"], (12,), generator=torch.Generator().manual_seed(1)).tolist()
    last = {}
    for name, p in (("quantized", path), ("dequantized", dequantized)):
        with moeedge.load(p, memory_budget="8GiB") as model:
            with model._turn() as seq:
                last[name], _ = model.runner.prompt(seq, ids, model.plan.prefill_chunk)
    assert (last["quantized"] - last["dequantized"]).abs().max() <= 3e-3


def prefetches(model, monkeypatch) -> list:
    """(MoE layer, experts, priority) of every prefetch the decoder asks for."""
    calls = []
    real = model.runner.experts.prefetch

    def spy(layer, experts, priority=0):
        calls.append((layer, list(experts), priority))
        return real(layer, experts, priority)
    monkeypatch.setattr(model.runner.experts, "prefetch", spy)
    return calls


@pytest.mark.parametrize("prompt_tokens, ahead", [(12, True), (4, False)])
def test_a_long_prompt_reads_the_next_layers_experts_ahead(tmp_path, monkeypatch, prompt_tokens, ahead):
    """12 rows route 24 times to 4 experts (at least NEXT_LAYER_ROUTES each on average): both MoE
    layers' experts are asked for before the first computes, the first layer's first (priority
    0, then -1), behind nothing; 4 rows (8 routes) are too few to guess that every expert will
    be wanted, and each layer reads what its routing asks for."""
    path, _ = gf.quantized_mixtral(tmp_path, "q4_k")
    with moeedge.load(path, memory_budget="8GiB") as model:
        calls = prefetches(model, monkeypatch)
        ids = list(range(1, prompt_tokens + 1))
        list(model.stream_ids(ids, max_new_tokens=1, temperature=0))
        own = next(i for i, (layer, _, p) in enumerate(calls) if layer == 0 and p == 1)  # layer 0's routing
        early = calls[:own]
    if ahead:
        assert [(layer, set(experts), p) for layer, experts, p in early] == [(0, set(range(4)), 0),
                                                                              (1, set(range(4)), -1)]
    else:
        assert early == []


def test_the_read_ahead_is_one_layer_where_the_cache_holds_two_to_four(tmp_path, monkeypatch):
    """Deeper read-ahead needs room for the layers being read and two more: a cache of 4 of 8
    layers' experts reads one layer ahead, so that a guess never evicts an expert of the
    layer computing; one of 5 reads READ_AHEAD_LAYERS ahead, one of 1 none."""
    path, _ = gf.quantized_mixtral(tmp_path, "q4_k")
    with moeedge.load(path, memory_budget="8GiB") as model:
        runner = model.runner
        monkeypatch.setattr(runner, "in_prompt", True)
        monkeypatch.setattr(runner, "cfg", dataclasses.replace(runner.cfg, moe_layers=list(range(8))))
        n, asked = runner.cfg.n_experts, []
        monkeypatch.setattr(runner.experts, "resident", lambda layer, e: False)
        monkeypatch.setattr(runner.experts, "prefetch", lambda layer, experts, priority=0: asked.append((layer, priority)))
        for layers, expected in [(1, []), (4, [(3, 0)]), (5, [(3, 0), (4, -1), (5, -2)])]:
            monkeypatch.setattr(type(runner.experts), "capacity", property(lambda self, k=layers: k * n))
            asked.clear()
            runner.read_ahead(2, 12)
            assert asked == expected, layers
        asked.clear()
        runner.read_ahead(6, 12)  # near the last layer: only the layers there are
        assert asked == [(7, 0)]
