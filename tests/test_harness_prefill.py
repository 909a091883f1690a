"""The harness's prefill cells (a model's prefill_tokens): a separate cold run per prompt
length, its own settings and record, and a table of its own; and bench/matrix.toml's
full-size entry parses into the cells the issue asks for."""
from __future__ import annotations

from pathlib import Path

import pytest

from moeedge.harness import matrix
from moeedge.harness.report import table

MATRIX = Path(__file__).parents[1] / "bench" / "matrix.toml"


def test_the_full_size_entry_plans_decode_and_prefill_cells_at_8_and_16_gib():
    settings, models = matrix.read_config(MATRIX)
    model = next(m for m in models if m.name == "mixtral-8x7b")
    assert model.hf is None and model.precisions == ["q4_k_m"] and model.prefill_tokens == [512]
    runs = matrix.plan([model], info=None)  # byte limits: no `moeedge info` needed
    assert {r.limit_bytes for r in runs} == {8 << 30, 16 << 30}
    assert {r.engine for r in runs} == {"moeedge", "moeedge-lru", "moeedge-prefetch", "llama.cpp", "llama.cpp-norepack"}
    assert sorted({r.prompt_tokens for r in runs}, key=str) == [512, None]
    assert len(runs) == 2 * 5 * 2 and all(r.source.endswith("mixtral-8x7b-q4_k_m.gguf") for r in runs)
    assert settings.llama_cpp_python  # a llama.cpp built for the machine, not the harness's own


def test_a_prefill_cell_takes_its_prompt_and_room_for_it(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 100)
    config = tmp_path / "m.toml"
    config.write_text(f"[settings]\ntokens = 8\nmax_context = 256\n[[model]]\nname='m'\ngguf={{q8_0='{gguf}'}}\n"
                      f"precisions=['q8_0']\nengines=['moeedge']\nlimits=['1GiB']\nprefill_tokens=[512]\n")
    settings, models = matrix.read_config(config)
    decode, prefill = matrix.plan(models, info=None)
    assert decode.prompt_tokens is None and prefill.prompt_tokens == 512
    assert matrix.select_cells([decode, prefill], "decode") == [decode]
    assert matrix.select_cells([decode, prefill], "prefill") == [prefill]
    assert matrix.select_cells([decode, prefill], "all") == [decode, prefill]
    with pytest.raises(ValueError, match="cells 'some' is not one of all, decode, prefill"):
        matrix.select_cells([decode], "some")
    assert matrix.for_run(settings, decode) == settings
    cell = matrix.for_run(settings, prefill)
    assert (cell.prompt_tokens, cell.max_context, cell.tokens) == (512, 520, 8)
    paths = [matrix.record_path(tmp_path, r, settings, "abc") for r in (decode, prefill)]
    assert paths[0] != paths[1] and "-p512-" in paths[1].name and "-p" not in paths[0].name.removeprefix("moeedge-q8_0")


@pytest.mark.parametrize("value", ["[0]", "['512']", "[40000]"])
def test_bad_prefill_lengths_name_the_problem(tmp_path, value):
    config = tmp_path / "m.toml"
    config.write_text(f"[[model]]\nname='m'\nhf='x'\nprefill_tokens={value}\n")
    with pytest.raises(ValueError, match=rf"{config}: model m: prefill_tokens .* are not prompt lengths"):
        matrix.read_config(config)


def test_prefill_cells_get_their_own_table():
    def record(engine, prefill, tok_s):
        return {"model": "m", "engine": engine, "precision": "q4_k_m", "limit_label": "8GiB", "limit_bytes": 8 << 30,
                "prefill_cell": prefill, "decode_tok_s": tok_s, "prefill_tok_s": 10 * tok_s, "peak_bytes": 1 << 30,
                "oom_kills": 0, "result": {}}
    oom = dict(record("llama.cpp", None, 0.0), decode_tok_s=None, prefill_tok_s=None, oom_kills=1, error="killed")
    shown = table([record("moeedge", None, 2.0), oom, record("llama.cpp-norepack", None, 1.0),
                   record("moeedge", 512, 3.0), record("llama.cpp", 512, 2.0), record("llama.cpp-norepack", 512, 1.0)])
    decode, prefill = shown.split("\n\n")
    # against the faster llama.cpp: its default was OOM-killed, so the one without repacking
    assert decode.count("| m | q4_k_m |") == 3 and "| 2.00 | 2.00x |" in decode and "OOM-killed" in decode
    assert prefill.count("| m | q4_k_m |") == 3 and "| 512 | 30.0 | 1.50x |" in prefill
