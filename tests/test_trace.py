"""Routing traces: the experts recorded are the ones transformers' routers pick."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import moeedge
from moeedge.trace import record, save
from test_switch_exact import IDS as SWITCH_IDS
from tiny_checkpoints import make_decoder, write_tokenizer
from tiny_switch import make_switch

TEXT = "the quick brown fox jumps over the lazy dog. experts route tokens; a cache keeps hot experts. " * 6


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trace")
    reference = make_decoder(directory, "mixtral", seed=6)
    write_tokenizer(directory)
    return directory, reference


def test_decoder_trace_matches_transformers_routers(mixtral, tmp_path):
    directory, reference = mixtral
    with moeedge.load(directory, memory_budget="4GiB") as model:
        trace = record(model, TEXT, hidden=True, window=64)
    ids = torch.as_tensor(trace["tokens"], dtype=torch.long)
    n, layers, k = trace["experts"].shape
    assert (n, layers, k) == (len(ids), 3, 2) and trace["hidden"].shape == (n, 3, 64)
    for start in range(0, n, 64):  # the same windows, fresh sequences
        with torch.no_grad():
            out = reference(ids[None, start:start + 64], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices.numpy()
            np.testing.assert_array_equal(trace["experts"][start:start + 64, layer], top)
    np.testing.assert_allclose(trace["gates"].sum(-1), 1.0, atol=1e-5)  # Mixtral renormalises top-2
    path = save(trace, tmp_path / "t.npz")
    loaded = np.load(path)
    assert int(loaded["format_version"]) == 1 and str(loaded["model"]) == str(directory)


def test_switch_trace_marks_dropped_tokens(tmp_path):
    make_switch(tmp_path)
    text = " ".join(map(str, SWITCH_IDS.tolist()))
    with moeedge.load(tmp_path, memory_budget="4GiB", max_context=128) as model:
        model.tokenizer = _IdTokenizer()
        trace = record(model, text, window=128)
    assert trace["experts_encoder"].shape[1:] == (2, 1) and trace["experts"].shape[1:] == (2, 1)
    assert (trace["experts_encoder"] == -1).any()  # capacity 3 drops tokens
    assert trace["experts"].max() < 8


class _IdTokenizer:
    """Space-separated ids: the tiny Switch checkpoint has no tokenizer files."""

    def encode(self, text):
        return [int(t) for t in text.split()]


def test_cli_writes_trace_and_refuses_bad_text(mixtral, tmp_path):
    directory, _ = mixtral
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "trace.npz"
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "trace", str(directory), "--text", str(text),
                          "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert np.load(out)["experts"].shape[1:] == (3, 2)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    run = subprocess.run([sys.executable, "-m", "moeedge.cli", "trace", str(directory), "--text", str(binary)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not UTF-8 text" in run.stderr and "Traceback" not in run.stderr
