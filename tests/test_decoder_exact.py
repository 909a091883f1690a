"""With experts offloaded and a cache that evicts on every token, moeedge's logits
equal transformers' fully loaded model (fp32, max abs diff <= 1e-4), and greedy
decoding picks the same 32 tokens."""
from __future__ import annotations

import pytest
import torch

import moeedge
from tiny_checkpoints import DECODERS, make_decoder

IDS = torch.randint(3, 160, (24,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module", params=DECODERS)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return directory, make_decoder(directory, request.param)


def tight(model):
    """Cache room for exactly one layer's top-k experts: every layer evicts the last one's."""
    slot = model.cache.store.slot_bytes(model.cache.store.keys()[0])
    model.cache.set_budget(model.config.top_k * slot)
    return model


def test_logits_match_transformers_with_evictions(checkpoint):
    directory, reference = checkpoint
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    with tight(moeedge.load(directory, memory_budget="8GiB")) as model:
        got = model.logits(IDS)
        stats = model.stats()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert stats["evictions"] > 0 and stats["misses"] > 0


def test_greedy_tokens_match_transformers(checkpoint):
    directory, reference = checkpoint
    prompt = IDS[:5]
    with torch.no_grad():
        out = reference.generate(prompt[None], max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, 5:].tolist()
    with tight(moeedge.load(directory, memory_budget="8GiB")) as model:
        model.config.eos_token_ids = []  # compare all 32 steps
        got = list(model.stream_ids(prompt.tolist(), max_new_tokens=32, temperature=0))
    assert got == out


def test_logits_do_not_depend_on_cache_size_or_prefetch(checkpoint):
    directory, _ = checkpoint
    with moeedge.load(directory, memory_budget="8GiB") as model:
        roomy = model.logits(IDS)
    with tight(moeedge.load(directory, memory_budget="8GiB", prefetch=True, policy="lfu")) as model:
        tight_prefetch = model.logits(IDS)
    assert torch.equal(roomy, tight_prefetch)


def test_sharded_checkpoint_matches(tmp_path):
    reference = make_decoder(tmp_path, "mixtral", seed=3, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    with tight(moeedge.load(tmp_path, memory_budget="8GiB")) as model:
        torch.testing.assert_close(model.logits(IDS), expected, atol=1e-4, rtol=0)
