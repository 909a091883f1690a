"""The full-size checkpoint writer, on small shapes of the same structure: transformers
and moeedge read what it writes, and agree."""
import pytest
import torch

import moeedge
from moeedge.synthetic import main


@pytest.mark.parametrize("name", ["mixtral-test", "switch-test"])
def test_written_checkpoint_loads_in_transformers_and_moeedge_alike(tmp_path, name):
    import transformers

    assert main([name, "-o", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # streamed shard by shard
    ids = torch.arange(3, 40)
    if name.startswith("mixtral"):
        ref = transformers.MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(ids[None]).logits[0]
        args = (ids,)
    else:
        ref = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
        dec = torch.arange(0, 20)
        with torch.no_grad():
            expected = ref.eval()(input_ids=ids[None], decoder_input_ids=dec[None]).logits[0]
        args = (ids, dec)
    with moeedge.load(tmp_path, memory_budget="4GiB", dtype=torch.float32, max_context=128) as model:
        assert model.checkpoint.config.dtype == torch.bfloat16
        torch.testing.assert_close(model.logits(*args), expected, atol=1e-4, rtol=0)
