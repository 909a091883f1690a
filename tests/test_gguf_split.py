"""GGUF models split over several files (NAME-00001-of-0000N.gguf), read as one model:
the Qwen2-MoE fixture re-split by gguf's own GGUFWriter (split_max_tensors, as
convert_hf_to_gguf.py --split-max-tensors and llama-gguf-split write parts), and by name
from a hub cache."""
from __future__ import annotations

import os
from pathlib import Path

import moeedge
import pytest
import torch
from hub_cache import cache_repo
from moeedge.formats.errors import CheckpointError
from moeedge.formats.open import open_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2moe-bpe.gguf"


def split_gguf(src: Path, out: Path, max_tensors: int) -> list[Path]:
    """src rewritten as parts of at most max_tensors tensors each (out: NAME.gguf); the parts' paths."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents(), split_max_tensors=max_tensors)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return split_gguf(FIXTURE, tmp_path_factory.mktemp("split") / "m.gguf", 15)


def test_split_gguf_reads_as_the_one_file_model(parts):
    assert [p.name for p in parts] == ["m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    ckpt = open_checkpoint(parts[0])
    assert ckpt.files == [str(p) for p in parts]
    assert {r[0] for ranges in ckpt.expert_ranges.values() for r in ranges} != {0}  # experts in later parts
    prompt = [5, 77, 120, 33, 9]
    with moeedge.load(FIXTURE, memory_budget="4GiB") as whole, moeedge.load(parts[0], memory_budget="4GiB") as split:
        torch.testing.assert_close(split.logits(prompt), whole.logits(prompt), atol=0, rtol=0)
        assert split.tokenizer.encode("def f(x):\n") == whole.tokenizer.encode("def f(x):\n")


def test_a_later_part_says_to_open_the_first(parts):
    with pytest.raises(CheckpointError, match=r"part 2 of a GGUF model split in 3 files; open its first part, "
                                              r"NAME-00001-of-00003.gguf"):
        open_checkpoint(parts[1])


def test_a_missing_part_is_named(parts, tmp_path):
    os.symlink(parts[0], tmp_path / parts[0].name)
    os.symlink(parts[1], tmp_path / parts[1].name)
    with pytest.raises(CheckpointError, match=r"the first of 3 parts of a split GGUF model; "
                                              r"'m-00003-of-00003.gguf' is missing beside it"):
        open_checkpoint(tmp_path / parts[0].name)


def test_a_split_gguf_by_name_from_the_cache(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {p.name.replace("m-", "model-Q8_0-"): p.read_bytes() for p in parts}
    snapshot = cache_repo(tmp_path, "org/tiny-GGUF", files)
    ckpt = open_checkpoint("org/tiny-GGUF:Q8_0")
    assert ckpt.files == [str(snapshot / f"model-Q8_0-0000{i}-of-00003.gguf") for i in (1, 2, 3)]
