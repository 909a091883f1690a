"""A downloaded checkpoint is untrusted: every file it names must lie inside it, be a
regular file, and every value it gives be checked before anything is sized by it.
Each bad input is refused when the checkpoint is opened, with a CheckpointError that
names the file, the field or tensor, and the value."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hostile_fixtures import (clone, deadline, drop_tensor, edit_json, hub_snapshot, replace_bytes,
                              rewrite_header, write_gguf)
from moeedge.formats import gguf_file
from moeedge.formats.errors import CheckpointError
from moeedge.formats.hf_config import decoder_config
from moeedge.formats.open import open_checkpoint
from tiny_checkpoints import make_decoder
from tiny_switch import make_switch

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny Mixtral (3 layers, 6 experts, hidden 64, vocab 160) in one file."""
    directory = tmp_path_factory.mktemp("mixtral")
    make_decoder(directory, "mixtral", seed=1)
    return directory


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same in shards, with model.safetensors.index.json."""
    directory = tmp_path_factory.mktemp("sharded")
    make_decoder(directory, "mixtral", seed=1, max_shard_size="200KB")
    return directory


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    directory = tmp_path_factory.mktemp("switch")
    make_switch(directory)
    return directory


def refused(source, match: str) -> str:
    with deadline(), pytest.raises(CheckpointError, match=match) as e:
        open_checkpoint(source)
    return str(e.value)


# --------------------------------------------------------------------------- files outside the checkpoint

def test_an_index_naming_a_file_outside_is_refused_without_reading_it(sharded, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes((1337).to_bytes(8, "little") + b"private")  # read as a header length: 1337
    directory = clone(sharded, tmp_path / "ckpt")
    edit_json(directory / INDEX, lambda d: d["weight_map"].update(
        {k: "../secret" for k in list(d["weight_map"])[:1]}))
    message = refused(directory, r"model\.safetensors\.index\.json: '\.\./secret' lies outside")
    assert "1337" not in message and "private" not in message


def test_an_index_naming_an_absolute_path_is_refused(sharded, tmp_path):
    directory = clone(sharded, tmp_path / "ckpt")
    edit_json(directory / INDEX, lambda d: d["weight_map"].update({k: "/etc/passwd" for k in d["weight_map"]}))
    refused(directory, r"index\.json: '/etc/passwd' is not a relative file name inside the checkpoint")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_symlink_out_of_the_directory_is_refused(mixtral, tmp_path, name):
    directory = clone(mixtral, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if (directory / name).exists():
        os.replace(directory / name, outside / name)
    else:
        (outside / name).write_text("{}")
    (directory / name).symlink_to(outside / name)
    refused(directory, rf"'{name}' lies outside the checkpoint's folder")


def test_a_symlink_within_the_directory_is_followed(mixtral, tmp_path):
    directory = clone(mixtral, tmp_path / "ckpt")
    (directory / "weights").mkdir()
    os.replace(directory / "model.safetensors", directory / "weights" / "model.safetensors")
    (directory / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    assert open_checkpoint(directory).expert_nbytes > 0


def test_a_hub_cache_snapshot_is_read_through_its_blob_links(mixtral, tmp_path):
    snapshot = hub_snapshot(mixtral, tmp_path / "hub")
    assert (snapshot / "model.safetensors").is_symlink()
    ckpt = open_checkpoint(snapshot)
    want = open_checkpoint(mixtral)
    assert ckpt.files == [str(snapshot / "model.safetensors")]
    assert torch.equal(ckpt.read_dense("model.norm.weight"), want.read_dense("model.norm.weight"))


def test_a_hub_cache_link_out_of_its_repository_is_refused(mixtral, tmp_path):
    snapshot = hub_snapshot(mixtral, tmp_path / "hub")
    other = tmp_path / "hub" / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    os.replace(snapshot.resolve() / os.readlink(snapshot / "model.safetensors"), other / "blob")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(Path("../../../models--other--repo/blobs/blob"))
    refused(snapshot, r"'model\.safetensors' lies outside the checkpoint's folder .*models--org--tiny")


# --------------------------------------------------------------------------- files that are not regular

@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", INDEX,
                                  "moeedge_predictor.safetensors", "generation_config.json"])
def test_a_fifo_is_refused_not_waited_on(mixtral, tmp_path, name):
    directory = clone(mixtral, tmp_path / "ckpt")
    if (directory / name).exists():
        (directory / name).unlink()
    os.mkfifo(directory / name)
    refused(directory, rf"{name}: a FIFO, not a regular file")


def test_a_fifo_gguf_is_refused(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    refused(tmp_path / "model.gguf", r"model\.gguf: a FIFO, not a regular file")


def test_a_directory_named_as_a_shard_is_refused(sharded, tmp_path):
    directory = clone(sharded, tmp_path / "ckpt")
    (directory / "sub").mkdir()
    edit_json(directory / INDEX, lambda d: d["weight_map"].update({k: "sub" for k in list(d["weight_map"])[:1]}))
    refused(directory, r"sub: a directory, not a regular file")


# --------------------------------------------------------------------------- the command line

def moeedge_info(source) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeedge.cli", "info", str(source)], capture_output=True,
                          text=True, timeout=120)


def test_cli_info_refuses_a_fifo_shard_in_one_line(mixtral, tmp_path):
    directory = clone(mixtral, tmp_path / "ckpt")
    (directory / "model.safetensors").unlink()
    os.mkfifo(directory / "model.safetensors")
    proc = moeedge_info(directory)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"moeedge: error: {directory / 'model.safetensors'}: a FIFO, "
                                                f"not a regular file; a checkpoint's files must be regular files"]


def test_cli_info_names_the_bad_field_in_one_line(mixtral, tmp_path):
    directory = clone(mixtral, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(num_hidden_layers="3"))
    proc = moeedge_info(directory)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"moeedge: error: {directory / 'config.json'}: num_hidden_layers "
                                                f"= '3': must be an integer from 1 to 1024"]


# --------------------------------------------------------------------------- huge counts

HUGE_HF = {"num_hidden_layers": 10 ** 9, "num_local_experts": 10 ** 8, "num_experts_per_tok": 10 ** 8,
           "num_attention_heads": 10 ** 8, "num_key_value_heads": 10 ** 8, "head_dim": 10 ** 8,
           "vocab_size": 10 ** 9, "max_position_embeddings": 10 ** 12, "hidden_size": 10 ** 9,
           "intermediate_size": 10 ** 9}
HUGE_SWITCH = {"num_layers": 10 ** 9, "num_decoder_layers": 10 ** 9, "num_experts": 10 ** 8, "vocab_size": 10 ** 9,
               "d_model": 10 ** 9, "d_ff": 10 ** 9, "expert_capacity": 10 ** 12,
               "relative_attention_num_buckets": 10 ** 12}
HUGE_GGUF = {"llama.block_count": 10 ** 9, "llama.expert_count": 10 ** 8, "llama.expert_used_count": 10 ** 8,
             "llama.attention.head_count": 10 ** 8, "llama.attention.head_count_kv": 10 ** 8,
             "llama.attention.key_length": 10 ** 8, "llama.embedding_length": 10 ** 9,
             "llama.feed_forward_length": 10 ** 9, "llama.context_length": 10 ** 12, "llama.vocab_size": 10 ** 9}
HUGE = [("hf", k) for k in HUGE_HF] + [("switch", k) for k in HUGE_SWITCH] + [("gguf", k) for k in HUGE_GGUF]
# Opens every source in a child whose address space is capped at 1 GiB above what it
# holds after imports: a list sized by a hostile count fails there, not on this machine.
CHILD = """
import json, resource, sys
from moeedge.formats.open import open_checkpoint
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
results = []
for source in sys.argv[1:]:
    try:
        open_checkpoint(source)
        results.append(["opened", ""])
    except BaseException as e:
        results.append([type(e).__name__, str(e)[:300]])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def huge_results(mixtral, switch, tmp_path_factory):
    root = tmp_path_factory.mktemp("huge")
    sources = []
    for kind, key in HUGE:
        case = root / f"{kind}-{key}"
        if kind == "gguf":
            case.mkdir()
            sources.append(write_gguf(case / "model.gguf", {key: ("u64", HUGE_GGUF[key])}))
            continue
        value = (HUGE_HF if kind == "hf" else HUGE_SWITCH)[key]
        clone(mixtral if kind == "hf" else switch, case)
        edit_json(case / "config.json", lambda c: c.update({key: value}))
        sources.append(case)
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, sources)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(HUGE, json.loads(proc.stdout)))


@pytest.mark.parametrize("case", HUGE, ids=[f"{kind}-{key}" for kind, key in HUGE])
def test_a_huge_count_is_refused_before_anything_is_sized_by_it(huge_results, case):
    kind, key = case
    error, message = huge_results[case]
    assert error == "CheckpointError", f"{key}: {error} {message}"
    assert key in message and ("must be an integer from" in message or "inconsistent" in message), message


def test_the_limits_admit_real_models(tmp_path):
    """A 256-expert, 256k-vocabulary, 1M-context, 1000-layer config passes the checks."""
    raw = {"model_type": "mixtral", "num_hidden_layers": 1000, "hidden_size": 7168, "num_attention_heads": 128,
           "num_key_value_heads": 128, "head_dim": 128, "vocab_size": 262144, "max_position_embeddings": 1 << 20,
           "num_local_experts": 256, "num_experts_per_tok": 8, "intermediate_size": 2048, "rope_theta": 1e6}
    cfg = decoder_config(raw, tmp_path / "config.json")
    assert (cfg.n_layers, cfg.n_experts, cfg.vocab, cfg.max_position) == (1000, 256, 262144, 1 << 20)


# --------------------------------------------------------------------------- bad values: config.json

BAD_CONFIG = [
    ({"num_hidden_layers": "3"}, r"num_hidden_layers = '3': must be an integer"),
    ({"num_local_experts": [6]}, r"num_local_experts = \[6\]: must be an integer"),
    ({"num_experts_per_tok": True}, r"num_experts_per_tok = True: must be an integer"),
    ({"hidden_size": 64.0}, r"hidden_size = 64\.0: must be an integer"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers = 0: must be an integer from 1"),
    ({"vocab_size": -5}, r"vocab_size = -5: must be an integer from 1"),
    ({"num_experts_per_tok": 7}, r"num_experts_per_tok = 7: exceeds the number of experts \(num_local_experts = 6\)"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads = 3: must divide num_attention_heads \(4\)"),
    ({"head_dim": 15}, r"head_dim = 15: must be even"),
    ({"rms_norm_eps": math.nan}, r"rms_norm_eps = nan: must be a finite number above zero"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps = 0: must be a finite number above zero"),
    ({"rms_norm_eps": -1e-5}, r"rms_norm_eps = -1e-05: must be a finite number above zero"),
    ({"rms_norm_eps": True}, r"rms_norm_eps = True: must be a finite number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, r"rope_parameters rope_theta = 0: must be"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": math.nan}}, r"rope_theta = nan: must be a finite"),
    ({"rope_parameters": None, "rope_theta": -10000.0}, r"rope_theta = -10000\.0: must be a finite number above zero"),
    ({"rope_parameters": [1]}, r"rope_parameters = \[1\]: must be an object"),
    ({"tie_word_embeddings": "false"}, r"tie_word_embeddings = 'false': must be true or false"),
    ({"eos_token_id": "2"}, r"eos_token_id = '2': must be a token id"),
    ({"bos_token_id": 160}, r"bos_token_id = 160: must be a token id, 0 to 159"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings = 0: must be an integer from 1"),
    # the router has 6 outputs, the config 5 experts
    ({"num_local_experts": 5}, r"block_sparse_moe\.gate\.weight' has shape \[6, 64\], config.json implies \[5, 64\]"),
    ({"num_hidden_layers": 2}, r"num_hidden_layers = 2, but .* holds 'model\.layers\.2\.[\w.]+' of layer '2'"),
    ({"vocab_size": 150}, r"'model\.embed_tokens\.weight' has shape \[160, 64\], config.json implies \[150, 64\]"),
]


@pytest.mark.parametrize("change, message", BAD_CONFIG, ids=[json.dumps(c) for c, _ in BAD_CONFIG])
def test_a_bad_config_value_is_refused_naming_file_field_and_value(mixtral, tmp_path, change, message):
    directory = clone(mixtral, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(change))
    refused(directory, rf"config\.json: .*{message}" if "has shape" not in message else message)


BAD_SWITCH = [
    ({"num_layers": "4"}, r"config\.json: num_layers = '4': must be an integer"),
    ({"num_experts": 0}, r"config\.json: num_experts = 0: must be an integer from 1"),
    ({"layer_norm_epsilon": math.nan}, r"layer_norm_epsilon = nan: must be a finite number above zero"),
    ({"router_bias": 1}, r"router_bias = 1: must be true or false"),
    ({"num_sparse_encoder_layers": 9}, r"num_sparse_encoder_layers = 9: must be an integer from 0 to 4"),
    ({"num_layers": 3, "num_sparse_encoder_layers": 1}, r"num_layers = 3, but .* holds 'encoder\.block\.3\."),
]


@pytest.mark.parametrize("change, message", BAD_SWITCH, ids=[json.dumps(c) for c, _ in BAD_SWITCH])
def test_a_bad_switch_config_value_is_refused(switch, tmp_path, change, message):
    directory = clone(switch, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(change))
    refused(directory, message)


# --------------------------------------------------------------------------- bad tensors and index files

def test_a_missing_dense_tensor_is_refused_at_open_not_a_key_error_later(mixtral, tmp_path):
    import moeedge

    directory = clone(mixtral, tmp_path / "ckpt")
    drop_tensor(directory / "model.safetensors", "model.layers.1.self_attn.k_proj.weight")
    refused(directory, r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' is missing")
    with pytest.raises(CheckpointError, match="k_proj.weight' is missing"):
        moeedge.load(directory, memory_budget="8GiB")


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight",
                                  "model.layers.2.block_sparse_moe.experts.3.w2.weight"])
def test_a_weight_stored_as_integers_is_refused(mixtral, tmp_path, name):
    directory = clone(mixtral, tmp_path / "ckpt")
    rewrite_header(directory / "model.safetensors", lambda h: h[name].update(dtype="I32"))  # same 4 bytes an item
    refused(directory, rf"'{name}' is int32, not a float dtype")


@pytest.mark.parametrize("index, message", [
    (b"not json", r"not a valid safetensors index"),
    (json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}).encode(), r"weight_map must map tensor names"),
    (json.dumps({"weight_map": {"a.weight": 3}}).encode(), r"weight_map must map .*got \{'a\.weight': 3\}"),
    (json.dumps({"weight_map": {}}).encode(), r"weight_map must map"),
    (json.dumps({"metadata": {}}).encode(), r"weight_map must map .*got None"),
    (json.dumps([1, 2]).encode(), r"not a valid safetensors index"),
    (b"\xff\xfe", r"not a valid safetensors index \(not UTF-8 at byte 0\)"),
])
def test_a_malformed_index_is_refused(sharded, tmp_path, index, message):
    directory = clone(sharded, tmp_path / "ckpt")
    replace_bytes(directory / INDEX, index)
    refused(directory, rf"{INDEX}: .*{message}")


# --------------------------------------------------------------------------- bad values: GGUF metadata

def test_the_tiny_gguf_opens(tmp_path):
    cfg = open_checkpoint(write_gguf(tmp_path / "model.gguf")).config
    assert (cfg.n_layers, cfg.n_experts, cfg.vocab, cfg.rope_theta) == (2, 4, 64, 10000.0)


BAD_GGUF = [
    ({"llama.block_count": ("str", "2")}, r"llama\.block_count = '2': must be an integer"),
    ({"llama.block_count": ("u32", 0)}, r"llama\.block_count = 0: must be an integer from 1"),
    ({"llama.expert_count": ("i32", -4)}, r"llama\.expert_count = -4: must be an integer from 1"),
    ({"llama.expert_used_count": ("u32", 5)}, r"inconsistent GGUF metadata: n_experts=4 top_k=5"),
    ({"llama.rope.freq_base": ("f32", 0.0)}, r"llama\.rope\.freq_base = 0\.0: must be a finite number above zero"),
    ({"llama.rope.freq_base": ("f32", -1.0)}, r"llama\.rope\.freq_base = -1\.0: must be a finite number"),
    ({"llama.rope.freq_base": ("f32", math.nan)}, r"llama\.rope\.freq_base = nan: must be a finite number"),
    ({"llama.rope.freq_base": ("bool", True)}, r"llama\.rope\.freq_base = True: must be a finite number"),
    ({"llama.attention.layer_norm_rms_epsilon": ("f32", math.nan)}, r"layer_norm_rms_epsilon = nan: must be"),
    ({"llama.attention.layer_norm_rms_epsilon": ("f32", 0.0)}, r"layer_norm_rms_epsilon = 0\.0: must be"),
    ({"llama.context_length": ("u32", 0)}, r"llama\.context_length = 0: must be an integer from 1"),
    ({"llama.block_count": ("u32", 1)}, r"unexpected tensor 'blk\.1\.[\w.]+' for a 1-layer model"),
    ({"llama.block_count": ("u32", 3)}, r"tensor 'blk\.2\.attn_norm\.weight' is missing"),
    ({"llama.expert_count": ("u32", 3)}, r"'blk\.0\.ffn_gate_inp\.weight' has shape \[4, 64\] .* implies \[3, 64\]"),
    ({"llama.vocab_size": ("u32", 65)}, r"'token_embd\.weight' has shape \[64, 64\] .* implies \[65, 64\]"),
    ({"llama.attention.head_count_kv": ("u32", 3)}, r"inconsistent GGUF metadata: .*n_heads=4 n_kv=3"),
]


@pytest.mark.parametrize("change, message", BAD_GGUF, ids=[json.dumps(c) for c, _ in BAD_GGUF])
def test_a_bad_gguf_value_is_refused_naming_file_field_and_value(tmp_path, change, message):
    path = write_gguf(tmp_path / "model.gguf", change)
    refused(path, rf"model\.gguf: .*{message}")


def test_a_huge_gguf_tensor_count_is_refused_before_the_parse(tmp_path):
    path = write_gguf(tmp_path / "model.gguf")
    with open(path, "r+b") as f:
        f.seek(8)  # after the magic and the version
        f.write((10 ** 9).to_bytes(8, "little"))
    refused(path, r"model\.gguf: GGUF header tensor count = 1000000000, more than the 65536 moeedge reads")


def test_a_huge_gguf_metadata_array_is_refused_before_it_is_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_file, "MAX_ARRAY", 1000)  # the real limit, 4M, in a file of 4 MiB or more
    path = write_gguf(tmp_path / "model.gguf", {"test.scores": ("array", [0.5] * 1001)})
    refused(path, r"model\.gguf: corrupt GGUF header \(an array at offset \d+ claims 1001 elements, more than the "
                  r"1000 moeedge reads\)")


def test_a_gguf_missing_a_dense_tensor_is_refused(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", drop=("blk.1.attn_k.weight",))
    refused(path, r"tensor 'blk\.1\.attn_k\.weight' is missing")


# --------------------------------------------------------------------------- fields transformers reads
# Each of these once loaded and ran, silently computing another model than transformers does.

def tiny_raw(family: str, **extra) -> dict:
    """A decoder config.json of a family, without RoPE fields."""
    raw = {"model_type": family, "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 160, "max_position_embeddings": 256, "num_experts_per_tok": 2,
           "intermediate_size": 96, "moe_intermediate_size": 48, **extra}
    raw["num_local_experts" if family == "mixtral" else "num_experts"] = 6
    return raw


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen2-MoE (qkv_bias: its q/k/v projections have biases)."""
    directory = tmp_path_factory.mktemp("qwen")
    make_decoder(directory, "qwen2_moe", seed=1)
    return directory


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_without_rope_fields_the_rope_base_is_transformers_default(tmp_path, family):
    import transformers

    raw = tiny_raw(family)
    reference = transformers.AutoConfig.for_model(**raw).rope_parameters["rope_theta"]
    assert decoder_config(raw, tmp_path / "config.json").rope_theta == reference
    assert reference == (1e6 if family == "mixtral" else 1e4)


def test_rope_scaling_replaces_rope_parameters_as_in_transformers(tmp_path):
    raw = tiny_raw("mixtral", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                   rope_scaling={"rope_type": "default", "rope_theta": 5e5})
    assert decoder_config(raw, tmp_path / "config.json").rope_theta == 5e5


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling rope_type 'linear' is not supported"),
    ({"rope_parameters": {"type": "dynamic"}}, r"rope_parameters rope_type .dynamic. is not supported"),
    ({"rope_scaling": "linear"}, r"rope_scaling = 'linear': must be an object"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor = 0\.5: partial rotary embeddings are not supported"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, r"rope_parameters = .*: per-layer-type RoPE"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu': is not supported; the experts compute SiLU"),
    ({"hidden_act": 5}, r"hidden_act = 5: is not supported"),
    ({"sliding_window": 0}, r"sliding_window = 0: must be a positive integer or null"),
    ({"sliding_window": -1}, r"sliding_window = -1: must be a positive integer or null"),
    ({"sliding_window": "16"}, r"sliding_window = '16': must be a positive integer or null"),
])
def test_a_field_moeedge_cannot_honour_is_refused(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        decoder_config(tiny_raw("mixtral", **change), tmp_path / "config.json")


def test_swish_is_silu(tmp_path):
    assert decoder_config(tiny_raw("mixtral", hidden_act="swish"), tmp_path / "config.json").family == "mixtral"


@pytest.mark.parametrize("family, extra, context", [
    ("mixtral", {"sliding_window": 16}, 16),
    ("mixtral", {"sliding_window": 4096}, 256),       # wider than the context: nothing to cap
    ("mixtral", {"sliding_window": None}, 256),
    ("olmoe", {"sliding_window": 16}, 256),           # OLMoE's mask ignores it
    ("qwen2_moe", {"sliding_window": 16}, 256),       # use_sliding_window is false by default
    ("qwen2_moe", {"sliding_window": 16, "use_sliding_window": True}, 16),
    ("qwen2_moe", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 0}, 256),
    ("qwen2_moe", {"sliding_window": 16, "use_sliding_window": True, "layer_types": ["full_attention"] * 4}, 256),
])
def test_a_sliding_window_caps_the_context_at_the_window(tmp_path, family, extra, context):
    """Within the window, sliding-window attention is full attention; past it moeedge refuses to go."""
    assert decoder_config(tiny_raw(family, **extra), tmp_path / "config.json").max_position == context


def test_sliding_layers_without_use_sliding_window_are_refused(tmp_path):
    raw = tiny_raw("qwen2_moe", sliding_window=16, layer_types=["sliding_attention"] * 4)
    with pytest.raises(CheckpointError, match=r"use_sliding_window = False: but layer_types names sliding layers"):
        decoder_config(raw, tmp_path / "config.json")


def test_a_sliding_window_checkpoint_refuses_a_longer_prompt(mixtral, tmp_path):
    import moeedge

    directory = clone(mixtral, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(sliding_window=4))
    model = moeedge.load(directory, memory_budget="8GiB")
    assert model.logits([1, 2, 3, 4]).shape[0] == 4
    with pytest.raises(ValueError, match="exceed max_context=4"):
        model.logits([1, 2, 3, 4, 5])


def test_qkv_bias_false_with_biases_in_the_file_is_refused(qwen, tmp_path):
    directory = clone(qwen, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(qkv_bias=False))
    refused(directory, r"config\.json: qkv_bias = False, but .* holds 'model\.layers\.0\.self_attn\.q_proj\.bias' "
                       r"\(transformers would ignore it\)")


def test_qkv_bias_true_without_a_bias_in_the_file_is_refused(qwen, tmp_path):
    directory = clone(qwen, tmp_path / "ckpt")
    drop_tensor(directory / "model.safetensors", "model.layers.2.self_attn.v_proj.bias")
    refused(directory, r"config\.json: qkv_bias = True, but tensor 'model\.layers\.2\.self_attn\.v_proj\.bias' is "
                       r"missing")


def test_qwen_with_its_biases_opens(qwen):
    assert open_checkpoint(qwen).config.qkv_bias


def test_biases_in_a_mixtral_file_are_refused(tmp_path):
    """Mixtral has no q/k/v biases: transformers ignores stored ones, so moeedge must not add them."""
    from types import SimpleNamespace

    from moeedge.formats.decoder_tensors import check_attention_biases

    cfg = decoder_config(tiny_raw("mixtral"), tmp_path / "config.json")
    tensors = {"model.layers.3.self_attn.k_proj.bias": SimpleNamespace(path="model.safetensors")}
    with pytest.raises(CheckpointError, match=r"config\.json: mixtral has no q/k/v biases, but model\.safetensors "
                                              r"holds 'model\.layers\.3\.self_attn\.k_proj\.bias'"):
        check_attention_biases(cfg, tensors, tmp_path / "config.json")


def test_olmoe_attention_bias_is_refused(tmp_path):
    """OLMoE's attention_bias puts a bias on o_proj too, which the decoder does not add."""
    with pytest.raises(CheckpointError, match=r"attention_bias = True: attention biases are not supported for olmoe"):
        decoder_config(tiny_raw("olmoe", attention_bias=True), tmp_path / "config.json")


@pytest.mark.parametrize("change, message", [
    ({"is_encoder_decoder": False}, r"is_encoder_decoder = False: a Switch Transformer is an encoder-decoder"),
    ({"encoder_sparse_step": -2 ** 31}, r"num_sparse_encoder_layers / encoder_sparse_step make encoder blocks \[\] "
                                        r"sparse, but the file has routers in blocks \[1, 3\]"),
    ({"decoder_sparse_step": 1}, r"decoder_sparse_step make decoder blocks \[0, 1, 2, 3\] sparse, but the file has "
                                 r"routers in blocks \[1, 3\]"),
    ({"encoder_sparse_step": "2"}, r"encoder_sparse_step = '2': must be an integer"),
])
def test_a_switch_config_disagreeing_with_its_experts_is_refused(switch, tmp_path, change, message):
    directory = clone(switch, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(change))
    refused(directory, r"config\.json: .*" + message)


def test_switch_sparse_steps_are_read_as_transformers_reads_them(switch, tmp_path):
    """A sparse step config.json gives overrides the one derived from the sparse count."""
    import transformers

    directory = clone(switch, tmp_path / "ckpt")
    edit_json(directory / "config.json", lambda c: c.update(encoder_sparse_step=2, num_sparse_encoder_layers=4))
    reference = transformers.AutoModelForSeq2SeqLM.from_config(transformers.AutoConfig.from_pretrained(directory))
    cfg = open_checkpoint(directory).config
    assert cfg.encoder_moe_blocks == [i for i, b in enumerate(reference.encoder.block) if b.is_sparse] == [1, 3]


# --------------------------------------------------------------------------- messages a checkpoint can lengthen

def one_short_line(message: str) -> str:
    """Any message a checkpoint can influence: one line of at most ~1000 characters."""
    assert "\n" not in message and len(message) <= 1000, (len(message), message[:300])
    return message


def test_many_missing_shards_are_counted_not_listed(sharded, tmp_path):
    directory = clone(sharded, tmp_path / "ckpt")
    edit_json(directory / INDEX, lambda d: d["weight_map"].update({f"t{i}": f"missing-{i:05}.safetensors"
                                                                    for i in range(10000)}))
    message = one_short_line(refused(directory, r"names shards that are missing: 'missing-00000\.safetensors', "))
    assert message.endswith("and 9997 more (10000 in all)")


def test_a_shard_name_with_a_newline_is_refused_in_one_line(sharded, tmp_path):
    directory = clone(sharded, tmp_path / "ckpt")
    name = "model-00001\nof-00010.safetensors"
    (directory / name).write_bytes((directory / "model-00001-of-00010.safetensors").read_bytes())
    edit_json(directory / INDEX, lambda d: d["weight_map"].update({k: name for k, v in d["weight_map"].items()
                                                                    if v == "model-00001-of-00010.safetensors"}))
    one_short_line(refused(directory, r"index\.json: shard name 'model-00001\\nof-00010\.safetensors' holds control"))


def test_long_tensor_names_are_cut_short(mixtral, tmp_path):
    directory = clone(mixtral, tmp_path / "ckpt")
    long_a, long_b = "a\n" * 50000, "b\n" * 50000

    def edit(h):
        h[long_a] = h.pop("model.norm.weight")
        h[long_b] = dict(h[long_a])  # the same bytes: the two overlap
    rewrite_header(directory / "model.safetensors", edit)
    one_short_line(refused(directory, r"tensors 'a\\na\\n.*\.\.\. and 'b\\nb\\n.*\.\.\. overlap"))


def test_invalid_gguf_dimensions_are_cut_short(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.x+\.\.\. has invalid dimensions \[1, 1, .*\.\.\.$"):
        gguf_file._tensor("m.gguf", b"blk.0." + b"x" * 10000, 255, [1] * 2000, 0, 0, 32, 0, 1 << 20)
    one_short_line(str(pytest.raises(CheckpointError, gguf_file._tensor, "m.gguf", b"x" * 10000, 255, [1] * 2000, 0,
                                     0, 32, 0, 1 << 20).value))
