"""A prompt runs in spans of several chunks, layer by layer (moeedge.models.decoder.prefill_span):
the same bits as chunk after chunk, with each expert the span routes to read once."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import moeedge
from moeedge.models.decoder import prefill_span
from tiny_checkpoints import make_decoder

PROMPT = torch.randint(3, 160, (70,), generator=torch.Generator().manual_seed(5)).tolist()
CHUNK = 16


def prompt_both_ways(model, ids: list[int]) -> tuple:
    """(logits, keys, experts read) of the span path, then of chunk-by-chunk steps, each cold."""
    runner, cache = model.runner, model.cache
    slot = cache.store.slot_bytes(cache.store.keys()[0])
    cache.set_budget(3 * slot)  # fewer than a layer's experts: a chunk evicts what the one before read
    results = []
    for spans in (True, False):
        seq = runner.new_sequence()
        before = cache.stats()["misses"]
        if spans:  # the tiny model's experts are too small for runner.prompt to take spans: one by hand
            logits = runner.step([(seq, torch.tensor(ids))], chunk=CHUNK)[0][-1]
        else:
            for i in range(0, len(ids), CHUNK):
                logits = runner.step([(seq, torch.tensor(ids[i:i + CHUNK]))])[0][-1]
        keys = runner.k_cache[seq.slot, :, :len(ids)].clone()
        results.append((logits, keys, cache.stats()["misses"] - before))
        runner.free(seq)
    return results


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_a_span_gives_the_chunks_bits_and_reads_each_expert_once(tmp_path, family):
    make_decoder(tmp_path, family, seed=4, dtype=torch.bfloat16)
    with moeedge.load(tmp_path, predictor=None, max_context=128, n_sequences=3) as model:
        model.plan = replace(model.plan, prefill_chunk=CHUNK)
        (span_logits, span_keys, span_misses), (chunk_logits, chunk_keys, chunk_misses) = \
            prompt_both_ways(model, PROMPT)
    assert torch.equal(span_logits, chunk_logits)
    assert torch.equal(span_keys, chunk_keys)
    n_moe, experts = len(model.config.moe_layers), model.config.n_experts
    assert span_misses <= n_moe * experts  # each expert at most once per layer
    assert chunk_misses > span_misses


def test_the_span_is_whole_chunks_within_its_bytes_and_the_context():
    class Cfg:  # Mixtral-8x7B
        top_k, hidden, n_experts, expert_intermediate, moe_layers = 2, 4096, 8, 14336, range(32)
    assert prefill_span(Cfg, 4096, 128) == 512  # 64 MiB of (5 + 2) x 4096 floats a row
    assert prefill_span(Cfg, 300, 128) == 300
    assert prefill_span(Cfg, 4096, 16) == 128  # at most 8 chunks
    Cfg.expert_intermediate = 8
    assert prefill_span(Cfg, 4096, 16) == 16  # small experts: never more than an eighth of them, nor below a chunk
