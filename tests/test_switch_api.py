"""Switch Transformers through moeedge.load: logits and greedy generation equal
transformers' with a one-expert cache that evicts all the time."""
import torch

import moeedge
from test_switch_exact import DECODER_IDS, IDS
from tiny_switch import make_switch


def test_load_logits_and_greedy_generation_match_transformers(tmp_path):
    ref = make_switch(tmp_path)
    with torch.no_grad():
        expected = ref(input_ids=IDS[None], decoder_input_ids=DECODER_IDS[None]).logits[0]
        greedy = ref.generate(IDS[None], max_new_tokens=32, do_sample=False, eos_token_id=None)[0, 1:].tolist()
    with moeedge.load(tmp_path, memory_budget="8GiB", max_context=128) as model:
        model.cache.set_budget(model.cache.store.slot_bytes(model.cache.store.keys()[0]))
        torch.testing.assert_close(model.logits(IDS, DECODER_IDS), expected, atol=1e-4, rtol=0)
        model.config.eos_token_ids = []
        assert list(model.stream_ids(IDS.tolist(), max_new_tokens=32, temperature=0)) == greedy
        assert model.stats()["evictions"] > 0
