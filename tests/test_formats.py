"""Hugging Face checkpoints: both config.json styles, and every bad input refused with a
message that names the file and the tensor."""
from __future__ import annotations

import json
import struct

import pytest
import torch

import moeedge
from moeedge.runtime.plan import FIXED_JITTER_BYTES
from moeedge.formats.errors import CheckpointError
from moeedge.formats.open import open_hf_directory
import hostile_fixtures
from tiny_checkpoints import make_decoder

IDS = torch.arange(3, 19)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixtral")
    return directory, make_decoder(directory, "mixtral", seed=1)


def copy_checkpoint(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_transformers_4_style_config_matches(mixtral, tmp_path):
    directory, reference = mixtral
    copy_checkpoint(directory, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.46.0"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    with moeedge.load(tmp_path, memory_budget="8GiB") as model:
        torch.testing.assert_close(model.logits(IDS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_are_multiplied_as_stored(tmp_path, dtype):
    """16-bit weights stay 16-bit in memory and in the cache; activations are fp32, so
    the result equals transformers in fp32 on the very same (16-bit-valued) weights."""
    reference = make_decoder(tmp_path, "olmoe", seed=2, dtype=dtype).float()
    with torch.no_grad():
        expected = reference(IDS[None]).logits[0]
    with moeedge.load(tmp_path, memory_budget="8GiB") as model:
        assert model.runner.dtype == torch.float32
        assert model.runner.w["model.layers.0.self_attn.q_proj.weight"].dtype == dtype
        got = model.logits(IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def rewrite_header(directory, edit):
    """Apply edit(header_dict) to model.safetensors' JSON header, keeping the data."""
    hostile_fixtures.rewrite_header(directory / "model.safetensors", edit)


def first_expert(header):
    return next(k for k in header if "experts.0.w1" in k)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h[first_expert(h)].update(dtype="F8_E4M3"), r"has dtype 'F8_E4M3'; supported"),
    (lambda h: h[first_expert(h)].update(shape=[3, 3]), r"needs 36 bytes but data_offsets"),
    (lambda h: h[first_expert(h)].update(data_offsets=[0, 10 ** 12]), r"needs .* bytes but data_offsets|past the end"),
    (lambda h: h.pop(first_expert(h)), r"expert tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' is missing"),
])
def test_corrupt_header_is_refused_naming_the_tensor(mixtral, tmp_path, edit, message):
    copy_checkpoint(mixtral[0], tmp_path)
    rewrite_header(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        open_hf_directory(tmp_path)


def test_overlapping_tensors_are_refused(mixtral, tmp_path):
    copy_checkpoint(mixtral[0], tmp_path)

    def overlap(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        size = a["data_offsets"][1] - a["data_offsets"][0]
        if b["data_offsets"][1] - b["data_offsets"][0] == size:
            b["data_offsets"] = list(a["data_offsets"])
    rewrite_header(tmp_path, overlap)
    with pytest.raises(CheckpointError, match="overlap|needs"):
        open_hf_directory(tmp_path)


def test_truncated_file_is_refused(mixtral, tmp_path):
    copy_checkpoint(mixtral[0], tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"past the end of the file .*truncated"):
        open_hf_directory(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"\x01\x00", "shorter than its 8-byte header length"),
    (struct.pack("<Q", 10 ** 9) + b"{}", "corrupt safetensors header length"),
    (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
])
def test_garbage_safetensors_is_refused(mixtral, tmp_path, content, message):
    copy_checkpoint(mixtral[0], tmp_path)
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        open_hf_directory(tmp_path)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, mixtral):
    (tmp_path / "config.json").write_text((mixtral[0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not even a pickle")
    with pytest.raises(CheckpointError, match=r"'pytorch_model.bin', a pickle checkpoint; moeedge never unpickles"):
        open_hf_directory(tmp_path)


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"model_type 'llama' is not supported; supported: mixtral"):
        open_hf_directory(tmp_path)


def test_missing_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_hf_directory(tmp_path)


def test_missing_shard_is_refused(tmp_path):
    make_decoder(tmp_path, "mixtral", max_shard_size="200KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shards that are missing"):
        open_hf_directory(tmp_path)


def test_budget_below_minimum_names_the_numbers(mixtral):
    with pytest.raises(moeedge.BudgetError, match=r"below the smallest workable budget .*fixed cost .*dense weights"):
        moeedge.load(mixtral[0], memory_budget="100MB")


def test_the_smallest_budget_caches_one_layers_experts_and_decodes_the_same(mixtral):
    ids = torch.tensor([1, 4, 2, 8, 5])
    with moeedge.load(mixtral[0], memory_budget="8GiB") as model:
        expected = model.logits(ids)
    with moeedge.load(mixtral[0], memory_budget="min") as model:
        plan = model.plan
        assert plan.budget_bytes == plan.min_budget_bytes
        slot = model.cache.store.slot_bytes(model.cache.store.keys()[0])
        # one layer's top-k, and the room the minimum leaves for a fresh process's larger fixed cost
        assert model.cache.stats()["budget_bytes"] <= model.config.top_k * slot + FIXED_JITTER_BYTES
        assert torch.equal(model.logits(ids), expected)


def test_context_overflow_is_refused(mixtral):
    with moeedge.load(mixtral[0], memory_budget="8GiB", max_context=16) as model:
        with pytest.raises(ValueError, match="exceed max_context=16"):
            model.logits(torch.arange(20))
