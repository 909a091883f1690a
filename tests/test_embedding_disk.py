"""The untied embedding table stays in its file (moeedge.runtime.embedding): rows read
as tokens come, the same values, and out of the memory plan."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import moeedge
from moeedge.formats.checkpoint import StoredTensor
from moeedge.formats.safetensors_file import read_header
from moeedge.runtime.embedding import EMBEDDING, DiskEmbedding
from tiny_checkpoints import make_decoder


def test_rows_equal_the_table(tmp_path):
    table = torch.randn(50, 8).to(torch.bfloat16)
    save_file({EMBEDDING: table, "other": torch.ones(3)}, tmp_path / "m.safetensors")
    rows = DiskEmbedding(StoredTensor(read_header(tmp_path / "m.safetensors")[EMBEDDING]))
    ids = torch.tensor([3, 0, 49, 3])
    assert torch.equal(rows.rows(ids, torch.float32), table[ids].float())
    assert rows.rows(torch.tensor([], dtype=torch.long), torch.float32).shape == (0, 8)
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        rows.rows(torch.tensor([50]), torch.float32)
    rows.close()


@pytest.mark.parametrize("tied", [False, True])
def test_an_untied_table_stays_on_disk_and_outputs_do_not_change(tmp_path, tied):
    reference = make_decoder(tmp_path, "mixtral", seed=5)
    if tied:  # rewrite the checkpoint without lm_head: the table is the output projection too
        import json

        from safetensors.torch import load_file
        shard = next(tmp_path.glob("*.safetensors"))
        tensors = load_file(shard)
        del tensors["lm_head.weight"]
        save_file(tensors, shard, metadata={"format": "pt"})
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        reference.lm_head.weight.data.copy_(reference.model.embed_tokens.weight.data)
    ids = torch.tensor([1, 5, 9, 2, 7])
    with moeedge.load(tmp_path, predictor=None) as model:
        got = model.logits(ids)
        on_disk = isinstance(model.runner.w[EMBEDDING], DiskEmbedding)
        table_bytes = reference.model.embed_tokens.weight.numel() * 4
        dense = sum(t.numel() * t.element_size() for n, t in model.runner.w.items() if n != EMBEDDING)
    assert on_disk is not tied  # a tied table is the output projection: it stays
    assert model.plan.dense_bytes == dense + (table_bytes if tied else 0)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
