"""Sampling as users expect: the checkpoint's generation_config.json (or a GGUF's
general.sampling.* keys), else llama.cpp's defaults; every CLI flag reaches the sampler;
a bad field in the file is ignored with a warning that names the file and the field."""
from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest

import moeedge
import moeedge.api
from moeedge import cli
from moeedge.formats.generation_config import SamplingConfigWarning
from moeedge.runtime.sampling import LLAMA_CPP_DEFAULTS
from tiny_checkpoints import make_decoder, write_tokenizer

PROMPT = [1, 5, 9, 14]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plain")
    make_decoder(directory, "mixtral", seed=6)
    write_tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return directory


def with_generation_config(plain, tmp_path, config) -> str:
    directory = tmp_path / "model"
    shutil.copytree(plain, directory)
    (directory / "generation_config.json").write_text(json.dumps(config))
    return str(directory)


def test_without_a_recommendation_llama_cpp_defaults_apply(plain):
    with moeedge.load(plain, memory_budget="4GiB", max_context=64) as model:
        assert model.sampling_defaults == LLAMA_CPP_DEFAULTS and model.sampling_from is None
        sampled = list(model.stream_ids(PROMPT, 12, seed=3))
        assert sampled == list(model.stream_ids(PROMPT, 12, temperature=0.8, top_k=40, top_p=0.95, seed=3,
                                                min_p=0.05, repeat_penalty=1.0, repeat_last_n=64))
        assert sampled != list(model.stream_ids(PROMPT, 12, seed=3, top_k=0, min_p=0.0, top_p=1.0, temperature=5.0))


def test_generation_config_fields_apply_over_llama_cpp_defaults(plain, tmp_path):
    source = with_generation_config(plain, tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                      "top_k": 20, "repetition_penalty": 1.1, "min_p": None})
    with moeedge.load(source, memory_budget="4GiB", max_context=64) as model:
        assert model.sampling_defaults == {**LLAMA_CPP_DEFAULTS, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                           "repeat_penalty": 1.1}
        assert model.sampling_from.endswith("generation_config.json")
        assert model.sampling_params(temperature=0).greedy  # a request's own value wins


def test_do_sample_false_is_greedy(plain, tmp_path):
    source = with_generation_config(plain, tmp_path, {"do_sample": False, "temperature": 0.6})
    with moeedge.load(source, memory_budget="4GiB", max_context=64) as model:
        assert model.sampling_defaults["temperature"] == 0.0
        assert list(model.stream_ids(PROMPT, 10)) == list(model.stream_ids(PROMPT, 10, temperature=0))


@pytest.mark.parametrize("field, value, reason", [
    ("temperature", "hot", "not a number"), ("temperature", -0.5, "must be >= 0"),
    ("top_k", 1.5, "not an integer"), ("top_k", True, "not an integer"), ("top_p", 5, "must be in (0, 1]"),
    ("min_p", -1, "must be in [0, 1]"), ("repetition_penalty", 0, "must be > 0"),
    ("do_sample", "yes", "not true or false"),
])
def test_a_bad_field_is_ignored_with_a_warning_naming_file_and_field(plain, tmp_path, field, value, reason):
    source = with_generation_config(plain, tmp_path, {field: value, "top_p": 0.5} if field != "top_p" else
                                    {field: value})
    expected_warning = rf"generation_config\.json: {field} = .* ignored \({re.escape(reason)}"
    with pytest.warns(SamplingConfigWarning, match=expected_warning) as w:
        model = moeedge.load(source, memory_budget="4GiB", max_context=64)
    with model:
        assert len(w) == 1
        expected = {**LLAMA_CPP_DEFAULTS, **({"top_p": 0.5} if field != "top_p" else {})}
        assert model.sampling_defaults == expected  # the good field kept, the bad one the default


def test_infinity_in_generation_config_is_ignored(plain, tmp_path):
    directory = with_generation_config(plain, tmp_path, {})
    with open(f"{directory}/generation_config.json", "w") as f:
        f.write('{"temperature": Infinity}')  # Python's json reads it; other writers may write it
    with pytest.warns(SamplingConfigWarning, match="temperature = inf ignored \\(not finite\\)"):
        moeedge.load(directory, memory_budget="4GiB", max_context=64).close()


def test_a_generation_config_that_is_not_an_object_is_ignored_with_a_warning(plain, tmp_path):
    source = with_generation_config(plain, tmp_path, [0.7])
    with pytest.warns(SamplingConfigWarning, match="not a JSON object"):
        with moeedge.load(source, memory_budget="4GiB", max_context=64) as model:
            assert model.sampling_defaults == LLAMA_CPP_DEFAULTS


def test_gguf_sampling_metadata_is_the_default(tmp_path):
    from gguf_fixtures import quantized_mixtral

    path, _ = quantized_mixtral(tmp_path, "q8_0", metadata={
        "general.sampling.temp": 0.25, "general.sampling.top_k": 7, "general.sampling.penalty_last_n": 32,
        "general.sampling.top_p": 2.0})
    with pytest.warns(SamplingConfigWarning, match=r"GGUF metadata: general\.sampling\.top_p = 2\.0 ignored"):
        model = moeedge.load(path, memory_budget="4GiB", max_context=64)
    with model:
        assert model.sampling_defaults == {**LLAMA_CPP_DEFAULTS, "temperature": 0.25, "top_k": 7,
                                           "repeat_last_n": 32}
        assert "general.sampling" in model.sampling_from


class Recorded:
    """Stands in for moeedge.api.Sampler, keeping the parameters each request asked for."""

    seen: list = []

    def __new__(cls, params):
        cls.seen.append(params)
        return REAL_SAMPLER(params)


REAL_SAMPLER = moeedge.api.Sampler
FLAGS = ["--temperature", "0.5", "--top-k", "3", "--top-p", "0.7", "--min-p", "0.2", "--repeat-penalty", "1.3",
         "--repeat-last-n", "9", "--seed", "11"]
GIVEN = dict(temperature=0.5, top_k=3, top_p=0.7, min_p=0.2, repeat_penalty=1.3, repeat_last_n=9, seed=11)


@pytest.mark.parametrize("command", ["run", "chat"])
def test_every_sampling_flag_reaches_the_sampler(plain, monkeypatch, capsys, command):
    Recorded.seen = []
    monkeypatch.setattr(moeedge.api, "Sampler", Recorded)
    lines = iter(["hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    extra = ["--prompt", "hello"] if command == "run" else []
    assert cli.main([command, str(plain), "--memory-budget", "4GiB", "--max-new-tokens", "3", *FLAGS, *extra]) == 0
    assert len(Recorded.seen) == 1
    assert {name: getattr(Recorded.seen[0], name) for name in GIVEN} == GIVEN
    if command == "chat":
        out = capsys.readouterr().out
        assert "sampling: temperature 0.5, top-k 3, top-p 0.7, min-p 0.2, repeat penalty 1.3 over 9 tokens" in out


def test_run_without_flags_samples_with_the_defaults(plain, monkeypatch):
    Recorded.seen = []
    monkeypatch.setattr(moeedge.api, "Sampler", Recorded)
    assert cli.main(["run", str(plain), "--memory-budget", "4GiB", "--max-new-tokens", "2", "--prompt", "hi"]) == 0
    params = Recorded.seen[0]
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)


def test_no_warning_for_a_plain_generation_config(plain):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingConfigWarning)
        moeedge.load(plain, memory_budget="4GiB", max_context=64).close()
