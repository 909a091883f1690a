"""A prompt's feed-forward products take the prompt kernels (moeedge.kernels.PROMPT_QUANTS:
the K-quants with x rounded per 256 values), a decode step's never: a decode step must keep
the one-token kernels' bits in any batch (test_batch_invariance.py), a prompt's result only
has to depend on the prompt."""
from __future__ import annotations

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
    """12 rows route 24 times to 4 experts (at least NEXT_LAYER_ROUTES each on average): the
    second MoE layer's experts are asked for while the first computes, behind its own reads;
    4 rows (8 routes) are too few to guess that every expert will be wanted."""
    path, _ = gf.quantized_mixtral(tmp_path, "q4_k")
    with moeedge.load(path, memory_budget="8GiB") as model:
        calls = prefetches(model, monkeypatch)
        ids = list(range(1, prompt_tokens + 1))
        list(model.stream_ids(ids, max_new_tokens=1, temperature=0))
        first_of_layer_1 = next(i for i, (layer, _, p) in enumerate(calls) if layer == 1 and p == 1)
        early = [c for c in calls[:first_of_layer_1] if c[0] == 1]
    if ahead:
        assert early and early[0][2] == 0 and set(early[0][1]) == set(range(4))
    else:
        assert early == []
