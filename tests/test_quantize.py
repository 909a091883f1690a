"""moeedge's group-wise int8/int4: the format, the native kernels against float64 on the
dequantized weights (AVX2 and portable paths), `moeedge quantize`, and reading its output.

The kernels round x to int16 per 32 values, which moves each x[i] by at most 0.51 s,
s = max|x| over its block / 32767; so an output may differ from the exact product on the
dequantized weights by at most sum_i |w[i]| * 0.51 s(i), plus fp32 rounding: one rounding
per block for its scale product and one per accumulation, at most (cols / 32 + 40) * 2**-24
of the sum of the absolute terms. The tests allow exactly that bound.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moeedge
from moeedge import _core
from moeedge.formats.open import open_checkpoint
from moeedge.cli import main
from moeedge.formats.errors import CheckpointError
from moeedge.formats.group_quant import GROUP_SIZES, dequantize, packed_nbytes, quantize
from moeedge.formats.quant_checkpoint import QUANT_FILE, expert_matrices
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.kernels import linear
from moeedge.quantize.writer import ExpertReader, open_source, quantize_checkpoint, write
from moeedge.quantize.bits import LayerCalibration, choose_bits, layer_sensitivity
from tiny_checkpoints import make_decoder, write_tokenizer

KERNELS = {8: _core.linear_int8, 4: _core.linear_int4}
CASES = [(bits, group) for bits in (8, 4) for group in GROUP_SIZES]



def random_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :7] *= 20  # an outlier group
    return w


# --------------------------------------------------------------------------- the format

@pytest.mark.parametrize("bits, group", CASES)
def test_each_weight_is_within_half_a_step_except_int4_clipped_at_7(bits, group):
    w = random_matrix(9, 160, seed=bits + group)  # 160 = 5 blocks: G = 64 and 128 end on a short group
    q, s = quantize(w, bits, group)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and q.shape == (9, 160 if bits == 8 else 80)
    assert s.dtype == torch.float16 and s.shape == (9, -(-160 // group))
    scale = s.float().repeat_interleave(group, dim=1)[:, :160]      # [9, 160] each weight's scale
    step = scale.abs()
    err = (dequantize(q, s, bits, group) - w).abs()
    clipped = w / scale > 7.5 if bits == 4 else torch.zeros_like(w, dtype=torch.bool)
    assert (err[~clipped] <= 0.5 * step[~clipped] * (1 + 1e-3)).all()
    assert (err[clipped] <= step[clipped]).all()


def test_int4_packs_weight_2j_in_the_low_nibble_as_q_plus_8():
    s = 0.01
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = -8 * s, 3 * s, 7 * s, -1 * s  # -8 s: the extreme, scale = s
    q, scales = quantize(w, 4, 32)
    assert scales.float().item() == pytest.approx(s, rel=1e-3)
    assert q[0, 0].item() == (3 + 8) << 4 | (-8 + 8) and q[0, 1].item() == (-1 + 8) << 4 | (7 + 8)
    assert (q[0, 2:] == 8 | 8 << 4).all()  # zeros


def test_int8_scale_is_max_over_127_and_a_zero_group_has_scale_0():
    w = torch.zeros(2, 64)
    w[0, 5] = -2.54
    q, s = quantize(w, 8, 32)
    assert s.float()[0, 0].item() == pytest.approx(0.02, rel=1e-3) and q[0, 5].item() == -127
    assert (s.float()[0, 1:] == 0).all() and (s.float()[1] == 0).all() and (q[1] == 0).all()


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.zeros(4, 40)), "multiple of 32"),
    (dict(w=torch.full((4, 32), float("nan"))), "NaN or infinity"),
    (dict(w=torch.full((4, 32), 1e6), bits=4), "overflows the fp16 scales"),
    (dict(bits=6), "bits must be 4 or 8"),
    (dict(group=48), "the group 32, 64, 128"),
])
def test_quantize_names_bad_input(bad, match):
    args = dict(w=torch.zeros(4, 32), bits=8, group=32) | bad
    with pytest.raises(ValueError, match=match):
        quantize(args["w"], args["bits"], args["group"])


# --------------------------------------------------------------------------- the kernels

def error_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T, rows] what the module docstring allows."""
    a = w.double().abs()
    step = x.double().abs().view(len(x), -1, 32).amax(-1) / 32767      # [T, cols / 32]
    rounding = a @ (0.51 * step.repeat_interleave(32, dim=1)).T        # [rows, T]
    terms = a @ x.double().abs().T
    return (rounding + (w.shape[1] / 32 + 40) * 2.0 ** -24 * terms).T.float()


def run_kernel(bits, group, x, q, s, rows, threads=0):
    out = torch.empty(len(x), rows)
    KERNELS[bits](x.numpy(), q.numpy(), s.numpy(), out.numpy(), group, threads)
    return out


# (tokens, rows, cols): odd rows, rows of 1, 3, 6, 32 and 10 blocks; 300 x 1024 is threaded
SHAPES = [(1, 7, 32), (2, 5, 96), (3, 33, 192), (16, 300, 1024), (5, 9, 320)]


@pytest.mark.parametrize("tokens, rows, cols", SHAPES)
@pytest.mark.parametrize("bits, group", CASES)
def test_kernel_matches_float64_on_the_dequantized_weights(path, bits, group, tokens, rows, cols):
    w = random_matrix(rows, cols, seed=rows + cols)
    q, s = quantize(w, bits, group)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    x[0, :32] *= 50  # one block with a large activation: its rounding step is 50x the others'
    got = run_kernel(bits, group, x, q, s, rows)
    wd = dequantize(q, s, bits, group, torch.float64)
    want = (x.double() @ wd.T).float()
    excess = (got - want).abs() - error_bound(wd, x)
    assert excess.max() <= 0, f"int{bits} g{group} {path}: {excess.max():.3g} over the bound"


@pytest.mark.parametrize("bits", [8, 4])
def test_threads_do_not_change_the_result(bits):
    w = random_matrix(300, 1024, seed=1)
    q, s = quantize(w, bits, 64)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run_kernel(bits, 64, x, q, s, 300, threads=1), run_kernel(bits, 64, x, q, s, 300, threads=0))


def test_kernel_gives_nan_for_a_nan_activation():
    q, s = quantize(random_matrix(4, 64, seed=0), 4, 32)
    x = torch.zeros(1, 64)
    x[0, 40] = float("nan")
    assert torch.isnan(run_kernel(4, 32, x, q, s, 4)).all()


def _kernel_args(**bad):
    q, s = quantize(random_matrix(4, 64, seed=0), 8, 32)
    args = dict(x=torch.zeros(2, 64).numpy(), qweight=q.numpy(), scales=s.numpy(), out=torch.empty(2, 4).numpy(),
                group=32)
    return args | bad


@pytest.mark.parametrize("bad, match", [
    (dict(group=48), "group must be a positive multiple of 32, got 48"),
    (dict(group=0), "group must be a positive multiple of 32, got 0"),
    (dict(x=torch.zeros(2, 40).numpy(), out=torch.empty(2, 4).numpy()), "whole 32-weight blocks, got in = 40"),
    (dict(qweight=torch.zeros(4, 32, dtype=torch.int8).numpy()), "qweight holds 128 bytes; int8 \\[4, 64\\] needs 256"),
    (dict(scales=torch.zeros(4, 1, dtype=torch.float16).numpy()), "scales holds 8 bytes; fp16 \\[4, 2\\]"),
    (dict(out=torch.empty(3, 4).numpy()), "x has 2 tokens but out has 3"),
    (dict(x=torch.zeros(2, 64, dtype=torch.float64).numpy()), "x \\(float32"),
    (dict(qweight=torch.zeros(8, 64, dtype=torch.int8).numpy()[::2]), "qweight must be C-contiguous"),
])
def test_kernel_names_bad_input(bad, match):
    args = _kernel_args(**bad)
    with pytest.raises(ValueError, match=match):
        _core.linear_int8(args["x"], args["qweight"], args["scales"], args["out"], args["group"])


@pytest.mark.parametrize("tokens", [1, 16, 17])  # 17: above the native kernels' tile of 16 tokens
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_on_a_packed_quant_tensor(bits, tokens):
    w = random_matrix(40, 96, seed=3)
    q, s = quantize(w, bits, 64)
    raw = torch.cat([q.view(torch.uint8).reshape(-1), s.view(torch.uint8).reshape(-1)])
    assert raw.numel() == packed_nbytes(f"int{bits}_g64", (40, 96))
    qt = QuantTensor(raw, f"int{bits}_g64", (40, 96))
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(4))
    wd = dequantize(q, s, bits, 64)
    assert torch.equal(qt.dequantize(torch.float32), wd)
    torch.testing.assert_close(linear(x, qt), x @ wd.T, rtol=1e-4, atol=1e-4)
    if tokens <= 16:
        assert torch.equal(linear(x, qt), run_kernel(bits, 64, x, q, s, 40))


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny fp32 Mixtral with a tokenizer (hidden 64, expert intermediate 96, 3 layers, 6 experts)."""
    directory = tmp_path_factory.mktemp("tiny")
    make_decoder(directory, "mixtral", seed=5)
    write_tokenizer(directory)
    return directory


def write_with_bits(source, out, bits: list[list[int]], group: int):
    ckpt = open_source(source)
    meta = {"format": "moeedge-groupwise", "version": 1, "group_size": group, "bits": bits, "quality": None}
    write(out, ckpt, ExpertReader(ckpt), bits, group, meta)


def dequantized_twin(qdir, out):
    """A plain fp32 checkpoint holding the quantized one's experts as they dequantize."""
    ckpt = open_checkpoint(qdir)
    tensors = {n: ckpt.read_dense(n) for n in ckpt.dense_names}
    reader = ExpertReader(ckpt)
    for layer in range(len(ckpt.config.moe_layers)):
        for e in range(ckpt.config.n_experts):
            w = reader(layer, e)
            for role, base, _ in expert_matrices(ckpt.config, layer, e):
                tensors[base + ".weight"] = w[role].contiguous()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(qdir / name, out / name)
    return out


MIXED = [[8, 4, 4, 8, 4, 4], [4, 4, 4, 4, 4, 8], [8, 8, 8, 8, 4, 8]]


@pytest.mark.parametrize("bits, group", [([[8] * 6] * 3, 32), ([[4] * 6] * 3, 128), (MIXED, 64)])
def test_loaded_model_matches_its_dequantized_twin(tiny, tmp_path, bits, group):
    qdir = tmp_path / "q"
    write_with_bits(tiny, qdir, bits, group)
    twin = dequantized_twin(qdir, tmp_path / "twin")
    ids = list(range(3, 27))
    with moeedge.load(qdir, memory_budget="2GiB") as model, moeedge.load(twin, memory_budget="2GiB") as ref:
        for n in (1, 12, 24):  # decode and short prefill through the native kernels; 24 tokens through torch
            torch.testing.assert_close(model.logits(ids[:n]), ref.logits(ids[:n]), rtol=2e-3, atol=2e-3)


def test_per_expert_bits_give_per_expert_layouts_in_one_layer(tiny, tmp_path):
    write_with_bits(tiny, tmp_path / "q", MIXED, 64)
    ckpt = open_checkpoint(tmp_path / "q")
    assert [p.quant for p in ckpt.expert_parts[0]] == ["int4_g64"] * 3       # the layer's most common layout
    assert [p.quant for p in ckpt.expert_parts[2]] == ["int8_g64"] * 3
    assert [p.quant for p in ckpt.parts_of(0, 0)] == ["int8_g64"] * 3
    assert [p.quant for p in ckpt.parts_of(0, 1)] == ["int4_g64"] * 3
    assert len(ckpt.expert_layouts) == 2 + 1 + 1
    sizes = {p.nbytes for p in ckpt.parts_of(0, 0)} | {p.nbytes for p in ckpt.parts_of(0, 1)}
    # gate and up [96, 64]: one scale per row; down [64, 96]: two (the second group is short)
    assert sizes == {96 * 64 + 96 * 2, 96 * 32 + 96 * 2, 64 * 96 + 64 * 2 * 2, 64 * 48 + 64 * 2 * 2}
    assert ckpt.expert_nbytes == sum(sum(p.nbytes for p in ckpt.parts_of(layer, e))
                                     for layer in range(3) for e in range(6))


def test_file_is_plain_safetensors_holding_what_quantize_gives(tiny, tmp_path):
    write_with_bits(tiny, tmp_path / "q", MIXED, 64)
    source = ExpertReader(open_source(tiny))(1, 5)  # 8 bits in MIXED
    cfg = open_checkpoint(tiny).config
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        for role, base, _ in expert_matrices(cfg, 1, 5):
            q, s = quantize(source[role], 8, 64)
            assert torch.equal(f.get_tensor(base + ".qweight"), q) and torch.equal(f.get_tensor(base + ".scales"), s)
        assert torch.equal(f.get_tensor("model.norm.weight"), open_checkpoint(tiny).read_dense("model.norm.weight"))
        assert f.metadata() == {"format": "pt"}


def test_reader_names_a_tensor_that_disagrees_with_moeedge_quant_json(tiny, tmp_path):
    write_with_bits(tiny, tmp_path / "q", [[4] * 6] * 3, 64)
    meta = json.loads((tmp_path / "q" / QUANT_FILE).read_text())
    meta["bits"][1][2] = 8
    (tmp_path / "q" / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w1\.qweight' is uint8\[96, 32\]; .* 8 bits .* "
                                              r"int8\[96, 64\]"):
        open_checkpoint(tmp_path / "q")
    meta["bits"] = [[4] * 6] * 2
    (tmp_path / "q" / QUANT_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="bits must list, for each of the 3 MoE layers"):
        open_checkpoint(tmp_path / "q")


# --------------------------------------------------------------------------- per-expert bits

def test_choose_bits_gives_8_to_the_most_sensitive_within_the_target():
    sensitivity = [[0.1, 0.5, 0.0, 0.2], [0.05, 0.3, 0.01, 0.4]]
    assert choose_bits(sensitivity, 6) == [[4, 8, 4, 8], [4, 8, 4, 8]]     # 4 of 8 experts
    assert choose_bits(sensitivity, 5.4) == [[4, 8, 4, 4], [4, 4, 4, 8]]   # 2.8 -> 2
    assert choose_bits(sensitivity, 4) == [[4] * 4] * 2 and choose_bits(sensitivity, 8) == [[8] * 4] * 2


def test_sensitivity_follows_routing_and_error():
    g = torch.Generator().manual_seed(0)
    experts = [{"gate": torch.randn(96, 64, generator=g) * s, "up": torch.randn(96, 64, generator=g) * s,
                "down": torch.randn(64, 96, generator=g) * s} for s in (0.05, 0.05, 0.05)]
    experts[1]["down"][:, :8] *= 30  # outliers: large groups lose the most at 4 bits
    n = 64
    picks = torch.tensor([[0, 1]] * (n // 2) + [[0, 0]] * (n // 2))  # expert 2 is never routed to
    calib = LayerCalibration(torch.randn(n, 64, generator=g), picks, torch.full((n, 2), 0.5))
    s = layer_sensitivity(calib, experts, 64)
    assert s[2] == 0.0 and s[1] > s[0] > 0


def test_auto_meets_the_target_and_records_how(tiny, tmp_path):
    meta = quantize_checkpoint(tiny, tmp_path / "q", per_expert_bits="auto", target_bits=6, group=32,
                               calibration_tokens=256, eval_tokens=0)
    bits, sens = meta["bits"], meta["selection"]["sensitivity"]
    assert sum(map(sum, bits)) == 9 * 8 + 9 * 4 and meta["bits_average"] == 6.0
    ranked = sorted((s, layer, e) for layer, row in enumerate(sens) for e, s in enumerate(row))
    assert all(bits[layer][e] == 8 for _, layer, e in ranked[9:])
    assert meta["selection"]["calibration"]["split"] == "train"
    assert json.loads((tmp_path / "q" / QUANT_FILE).read_text())["bits"] == bits


# --------------------------------------------------------------------------- the command

def test_cli_writes_a_checkpoint_and_measures_it(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), "--bits", "8", "--group", "32", "-o", str(out), "--eval-tokens", "128",
                 "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["bits"] == [[8] * 6] * 3 and meta["group_size"] == 32 and meta["bits_per_weight"] == 8.5
    q = meta["quality"]
    assert q["tokens"] > 100 and q["ppl_ratio"] == pytest.approx(1, abs=0.01) and q["top1_agreement"] > 0.9
    assert meta["expert_bytes"] == meta["expert_bytes_source"] * 8.5 / 32  # fp32 source
    assert json.loads((out / QUANT_FILE).read_text()) == meta
    assert (out / "config.json").read_text() == (tiny / "config.json").read_text()
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".q.partial-*"))


@pytest.fixture(scope="module")
def not_moe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    save_file({"model.norm.weight": torch.ones(64)}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("args, message", [
    (["{tiny}", "--bits", "6", "-o", "{out}"], "--bits must be 8 or 4, got 6"),
    (["{tiny}", "-o", "{out}"], "--bits must be 8 or 4, got None"),
    (["{tiny}", "--bits", "4", "--group", "48", "-o", "{out}"], "--group must be one of 32, 64, 128, got 48"),
    (["{tiny}", "--per-expert-bits", "auto", "--target-bits", "9", "-o", "{out}"], "between 4 and 8, got 9.0"),
    (["{tiny}", "--per-expert-bits", "auto", "--target-bits", "3.5", "-o", "{out}"], "between 4 and 8, got 3.5"),
    (["{tiny}", "--per-expert-bits", "auto", "-o", "{out}"], "--target-bits between 4 and 8, got None"),
    (["{tiny}", "--per-expert-bits", "fixed", "--target-bits", "6", "-o", "{out}"], "must be 'auto', got 'fixed'"),
    (["{tiny}", "--bits", "8", "--target-bits", "6", "-o", "{out}"], "--target-bits goes with --per-expert-bits auto"),
    (["{tiny}", "--bits", "8", "-o", "{nonempty}"], "exists and is not an empty directory"),
    (["{not_moe}", "--bits", "8", "-o", "{out}"], "model_type 'llama' is not supported"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny, not_moe, tmp_path, capsys, args, message):
    nonempty = tmp_path / "full"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    paths = dict(tiny=tiny, not_moe=not_moe, nonempty=nonempty, out=tmp_path / "out")
    assert main(["quantize", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and list(nonempty.iterdir()) == [nonempty / "x"]
