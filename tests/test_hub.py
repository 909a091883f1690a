"""Models by name: Hugging Face repo ids resolved from a cache laid out as huggingface_hub
lays it out (offline), and downloaded from a stand-in hub on loopback (HF_ENDPOINT)."""
from __future__ import annotations

import json
import os

import pytest
from hub_cache import cache_repo
from hub_stub import HubStub, StubRepo, directory_files
from moeedge.formats.errors import CheckpointError
from moeedge.formats.hub import resolve
from moeedge.formats.hub_files import RepoRef, parse_ref, quant_tag, select
from moeedge.formats.open import open_checkpoint

CONFIG = b'{"model_type": "mixtral"}'


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty hub cache under HF_HOME, online (no network: the endpoint refuses connections)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path / "hf" / "hub"


# ---------------------------------------------------------------- names and file choice

@pytest.mark.parametrize("text, ref", [
    ("org/name", RepoRef("org/name")),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", RepoRef("mistralai/Mixtral-8x7B-Instruct-v0.1")),
    ("org/name@v1.0", RepoRef("org/name", "v1.0")),
    ("org/name@refs/pr/3", RepoRef("org/name", "refs/pr/3")),
    ("user/Model-GGUF:Q4_K_M", RepoRef("user/Model-GGUF", "main", "Q4_K_M")),
    ("user/m@0123456789abcdef0123456789abcdef01234567:q8_0",
     RepoRef("user/m", "0123456789abcdef0123456789abcdef01234567", "q8_0")),
])
def test_repo_ids_parse(text, ref):
    assert parse_ref(text) == ref


@pytest.mark.parametrize("text", ["name", "a/b/c", "models/mixtral.gguf", "out/model.safetensors", "/abs/path", "./org/name", "org/na--me", "org/..",
                                  "org/name@../../x", "org/name@", "org/name:", "~/models/x", "org/name@a//b"])
def test_non_repo_ids_are_refused(text):
    assert parse_ref(text) is None


def test_safetensors_repo_fetches_only_what_moeedge_reads():
    names = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth",
             "README.md", ".gitattributes", "sub/model.safetensors"]
    chosen = select(RepoRef("o/n"), names, "the hub")
    assert chosen.kind == "safetensors" and chosen.entry == ""
    assert set(chosen.files) == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                 "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                 "tokenizer.json", "tokenizer_config.json"}


def test_a_repo_without_safetensors_or_gguf_says_what_it_has():
    with pytest.raises(CheckpointError, match=r"no \.safetensors or \.gguf files \(it has 'config.json', "
                                              r"'pytorch_model.bin'\).*never unpickles"):
        select(RepoRef("o/n"), ["config.json", "pytorch_model.bin"], "the hub")


@pytest.mark.parametrize("name, tag", [("m-Q4_K_M.gguf", "Q4_K_M"), ("m.q8_0.gguf", "Q8_0"), ("m-F16.gguf", "F16"),
                                       ("sub/m-IQ4_XS-00002-of-00003.gguf", "IQ4_XS"), ("model.gguf", None)])
def test_quant_tags_are_read_from_file_names(name, tag):
    assert quant_tag(name) == tag


GGUFS = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-Q2_K-00001-of-00002.gguf", "m-Q2_K-00002-of-00002.gguf",
         "mmproj-m-F16.gguf", "README.md"]


@pytest.mark.parametrize("quant, entry", [("q8_0", "m-Q8_0.gguf"), ("Q4_K_M", "m-Q4_K_M.gguf"),
                                          (None, "m-Q4_K_M.gguf"), ("Q2_K", "m-Q2_K-00001-of-00002.gguf")])
def test_gguf_quant_tag_picks_the_file(quant, entry):
    chosen = select(RepoRef("o/n", quant=quant), GGUFS, "the hub")
    assert chosen.kind == "gguf" and chosen.entry == entry
    assert all(quant_tag(f) == quant_tag(entry) for f in chosen.files)


def test_gguf_unknown_tag_lists_the_tags():
    with pytest.raises(CheckpointError, match=r"no GGUF file for quant tag :Q5_K_S; its tags: Q2_K, Q4_K_M, "
                                              r"Q8_0 \(name one as o/n:TAG\)"):
        select(RepoRef("o/n", quant="Q5_K_S"), GGUFS, "the hub")


def test_gguf_split_with_a_part_missing_is_refused():
    with pytest.raises(CheckpointError, match=r"parts \[1\] of the 2-part split GGUF .*; all 2 are needed"):
        select(RepoRef("o/n", quant="Q2_K"), ["m-Q2_K-00001-of-00002.gguf"], "the hub")


# ---------------------------------------------------------------- the cache, offline

def test_cached_snapshot_resolves_offline_with_revisions(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = cache_repo(hf_env, "org/tiny", {"config.json": CONFIG, "model.safetensors": b"a"})
    v1 = cache_repo(hf_env, "org/tiny", {"config.json": CONFIG, "model.safetensors": b"b"}, revision="v1")
    assert resolve("org/tiny") == main
    assert resolve("org/tiny@v1") == v1
    assert resolve(f"org/tiny@{v1.name}") == v1
    assert (resolve("org/tiny") / "model.safetensors").read_bytes() == b"a"


def test_hf_hub_cache_overrides_hf_home(hf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    snapshot = cache_repo(tmp_path / "elsewhere", "org/tiny", {"config.json": CONFIG, "model.safetensors": b"a"})
    assert resolve("org/tiny") == snapshot


def test_cached_gguf_quant_tag(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_repo(hf_env, "org/m-GGUF", {"m-Q4_K_M.gguf": b"GGUF4", "m-Q8_0.gguf": b"GGUF8"})
    assert resolve("org/m-GGUF:Q8_0") == snapshot / "m-Q8_0.gguf"
    assert resolve("org/m-GGUF") == snapshot / "m-Q4_K_M.gguf"


def test_not_cached_offline_is_one_line_naming_repo_and_cache(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        resolve("org/absent")
    assert str(e.value) == (f"org/absent is not in the Hugging Face cache ({hf_env}) and HF_HUB_OFFLINE is set: "
                            f"download it online once, or unset HF_HUB_OFFLINE")


def test_not_cached_without_network_is_one_line(hf_env):
    with pytest.raises(CheckpointError, match=rf"^org/absent is not in the Hugging Face cache \({hf_env}\) and the "
                                              r"hub cannot be reached \(") as e:
        resolve("org/absent")
    assert "\n" not in str(e.value)


def test_incomplete_snapshot_is_not_used_offline(hf_env, monkeypatch):
    """A blob still downloading (or deleted) leaves a broken symlink: not a cached model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_repo(hf_env, "org/tiny", {"config.json": CONFIG, "model.safetensors": b"a"})
    os.unlink(os.path.realpath(snapshot / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"^org/tiny: the cached snapshot .* lacks 'model.safetensors' \(a "
                                              r"download cut short, or deleted blobs\); HF_HUB_OFFLINE is set"):
        resolve("org/tiny")


def test_cached_gguf_repo_without_the_tag_says_which_it_has(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(hf_env, "org/m-GGUF", {"m-Q4_K_M.gguf": b"GGUF4"})
    with pytest.raises(CheckpointError, match=r"^org/m-GGUF:Q8_0: the cached snapshot .* has no GGUF file for quant "
                                              r"tag :Q8_0; its tags: Q4_K_M .*HF_HUB_OFFLINE is set"):
        resolve("org/m-GGUF:Q8_0")


def test_snapshot_symlink_escaping_the_repo_folder_is_refused(hf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_repo(hf_env, "org/evil", {"config.json": CONFIG})
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"secret")
    os.symlink(outside, snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.safetensors' lies outside the checkpoint's folder "
                                              r".*models--org--evil"):
        resolve("org/evil")


def test_snapshot_folder_symlinked_out_of_the_repo_folder_is_refused(hf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_repo(hf_env, "org/evil", {"README.md": b"x"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_bytes(CONFIG)
    (elsewhere / "model.safetensors").write_bytes(b"w")
    os.unlink(snapshot / "README.md")
    snapshot.rmdir()
    os.symlink(elsewhere, snapshot)
    with pytest.raises(CheckpointError, match=r"a cached snapshot whose real path .* lies outside its repo's cache "
                                              r"folder .*models--org--evil; refused"):
        resolve("org/evil")


def test_a_damaged_ref_is_refused(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(hf_env, "org/tiny", {"config.json": CONFIG, "model.safetensors": b"a"})
    (hf_env / "models--org--tiny" / "refs" / "main").write_text("../../../etc")
    with pytest.raises(CheckpointError, match=r"refs/main: holds '../../../etc', not a commit hash \(a damaged "
                                              r"cache: delete .*models--org--tiny\)"):
        resolve("org/tiny")


def test_symlink_into_another_repos_blobs_is_refused(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = cache_repo(hf_env, "org/other", {"m-Q8_0.gguf": b"GGUF"})
    snapshot = cache_repo(hf_env, "org/evil", {"README.md": b"x"})
    os.symlink(os.path.realpath(other / "m-Q8_0.gguf"), snapshot / "m-Q8_0.gguf")
    with pytest.raises(CheckpointError, match="lies outside the checkpoint's folder .*models--org--evil"):
        resolve("org/evil:Q8_0")


def test_neither_a_path_nor_a_repo_id(hf_env):
    with pytest.raises(CheckpointError, match=r"^'no/such/dir': no such file or directory, and not a Hugging Face "
                                              r"repo id"):
        open_checkpoint("no/such/dir")


def test_an_existing_local_path_wins_over_a_repo_id(hf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    (tmp_path / "org" / "tiny" / "config.json").write_bytes(b'{"model_type": "llama"}')
    cache_repo(hf_env, "org/tiny", {"config.json": CONFIG, "model.safetensors": b"a"})
    with pytest.raises(CheckpointError, match=r"^org/tiny/config.json: model_type 'llama' is not supported"):
        open_checkpoint("org/tiny")


# ---------------------------------------------------------------- downloading (stub hub on loopback)

FILES = {"config.json": CONFIG, "generation_config.json": b"{}", "model.safetensors": b"w" * 4096,
         "tokenizer.json": b"{\"v\": 1}", "pytorch_model.bin": b"pickle", "consolidated.safetensors": b"c",
         "original/consolidated.00.pth": b"p", "README.md": b"# hi", "m-Q4_K_M.gguf": b"GGUF"}


def test_download_fetches_only_allowed_files_then_works_offline(hf_env, monkeypatch):
    with HubStub({"org/tiny": StubRepo(FILES)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        snapshot = resolve("org/tiny")
    assert sorted(f.removeprefix("org/tiny/") for f in hub.fetched) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert snapshot == hf_env / "models--org--tiny" / "snapshots" / StubRepo(FILES).commit
    assert (snapshot / "model.safetensors").is_symlink() and (snapshot / "model.safetensors").read_bytes() == b"w" * 4096
    assert (hf_env / "models--org--tiny" / "refs" / "main").read_text() == StubRepo(FILES).commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the stub is gone: the cache alone answers
    assert resolve("org/tiny") == snapshot


@pytest.mark.slow  # huggingface_hub retries the broken file five times, with pauses
def test_an_interrupted_download_keeps_the_files_it_finished(hf_env, monkeypatch):
    """huggingface_hub moves each finished file into blobs/ at once: a second run fetches the rest."""
    files = {"config.json": CONFIG, "model-00001-of-00002.safetensors": b"1" * 3000,
             "model-00002-of-00002.safetensors": b"2" * 3000}
    repo = StubRepo(files, broken={"model-00002-of-00002.safetensors"})
    with HubStub({"org/tiny": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError, match=r"^org/tiny: the download was interrupted \(.*\); run again "
                                                   r"to fetch the rest"):
            resolve("org/tiny")
        assert sorted(hub.fetched) == ["org/tiny/config.json", "org/tiny/model-00001-of-00002.safetensors"]
        repo.broken.clear()
        hub.fetched.clear()
        snapshot = resolve("org/tiny")
    assert hub.fetched == ["org/tiny/model-00002-of-00002.safetensors"]
    assert (snapshot / "model-00002-of-00002.safetensors").read_bytes() == b"2" * 3000


def test_cache_first_makes_no_request(hf_env, monkeypatch):
    cache_repo(hf_env, "org/tiny", {"config.json": CONFIG, "model.safetensors": b"a"})
    with HubStub({"org/tiny": StubRepo(FILES)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        resolve("org/tiny")
    assert hub.requests == []


def test_download_gguf_quant_fetches_that_file_only(hf_env, monkeypatch):
    files = {"m-Q4_K_M.gguf": b"GGUF4", "m-Q8_0.gguf": b"GGUF8", "README.md": b"x"}
    with HubStub({"org/m-GGUF": StubRepo(files)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = resolve("org/m-GGUF:Q8_0")
    assert path.name == "m-Q8_0.gguf" and path.read_bytes() == b"GGUF8"
    assert hub.fetched == ["org/m-GGUF/m-Q8_0.gguf"]


def test_download_a_revision(hf_env, monkeypatch):
    repo = StubRepo({"config.json": CONFIG, "model.safetensors": b"v"}, branches=("main", "v2"))
    with HubStub({"org/tiny": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert resolve("org/tiny@v2").name == repo.commit
        with pytest.raises(CheckpointError, match=r"^org/tiny@v3: the repo has no revision 'v3'$"):
            resolve("org/tiny@v3")
    assert (hf_env / "models--org--tiny" / "refs" / "v2").read_text() == repo.commit


def test_gated_repo_names_hf_token(hf_env, monkeypatch):
    with HubStub({"org/gated": StubRepo(FILES, gated=True)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError, match=r"^org/gated is a gated model: accept its terms at "
                                                  r"https://huggingface.co/org/gated, then set HF_TOKEN"):
            resolve("org/gated")


def test_gated_repo_with_a_token_without_access(hf_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    with HubStub({"org/gated": StubRepo(FILES, gated=True)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError, match=r"^org/gated is a gated model and HF_TOKEN's token has no access "
                                                  r"to it: accept its terms at https://huggingface.co/org/gated"):
            resolve("org/gated")
    assert hub.fetched == []


def test_unknown_repo_says_so(hf_env, monkeypatch):
    with HubStub({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError, match=r"^org/nope: no such local path, and no such model on the hub, "
                                                  r"or it is private \(set HF_TOKEN"):
            resolve("org/nope")


def test_unsupported_model_is_refused_before_its_weights_are_fetched(hf_env, monkeypatch):
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * 4096}
    with HubStub({"org/dense": StubRepo(files)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError, match=r"config.json: model_type 'llama' is not supported; supported: "
                                                  r"mixtral"):
            open_checkpoint("org/dense")
    assert hub.fetched == ["org/dense/config.json"]


def test_hub_repo_of_pickles_is_refused_before_downloading(hf_env, monkeypatch):
    with HubStub({"org/old": StubRepo({"config.json": CONFIG, "pytorch_model.bin": b"p"})}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(CheckpointError, match="no .safetensors or .gguf files"):
            resolve("org/old")
    assert hub.fetched == []


# ---------------------------------------------------------------- a real model, by name

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_checkpoints import make_decoder, write_tokenizer

    directory = tmp_path_factory.mktemp("tiny")
    make_decoder(directory, "mixtral", seed=4)
    write_tokenizer(directory)
    return directory


def test_cli_runs_a_model_by_name_from_an_offline_cache(hf_env, monkeypatch, tiny_model, capsys):
    from moeedge.cli import main

    with HubStub({"org/tiny-moe": StubRepo(directory_files(tiny_model))}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        resolve("org/tiny-moe")  # the cache prepared by huggingface_hub's own download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--prompt", "the quick", "--max-new-tokens", "6", "--temperature", "0", "--memory-budget", "4GiB"]
    assert main(["run", "org/tiny-moe", *args]) == 0
    by_name = capsys.readouterr().out
    assert main(["run", str(tiny_model), *args]) == 0
    assert by_name == capsys.readouterr().out and by_name.strip()
    assert main(["info", "org/tiny-moe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"].endswith(f"models--org--tiny-moe/snapshots/{StubRepo({}).commit}")


def test_cli_runs_a_gguf_by_quant_tag_from_an_offline_cache(hf_env, monkeypatch, capsys):
    from pathlib import Path

    from moeedge.cli import main

    fixture = Path(__file__).parent / "fixtures" / "qwen2moe-bpe.gguf"
    cache_repo(hf_env, "org/tiny-GGUF", {"tiny-F16.gguf": fixture.read_bytes(), "README.md": b"x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--prompt", "def f(x):", "--max-new-tokens", "4", "--temperature", "0", "--memory-budget", "4GiB"]
    assert main(["run", "org/tiny-GGUF:f16", *args]) == 0
    by_name = capsys.readouterr().out
    assert main(["run", str(fixture), *args]) == 0
    assert by_name == capsys.readouterr().out and by_name.strip()


def test_cli_model_not_cached_offline_exits_2(hf_env, monkeypatch, capsys):
    from moeedge.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "org/absent", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "org/absent is not in the Hugging Face cache" in err and "Traceback" not in err
