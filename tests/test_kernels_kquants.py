"""The native GGUF Q4_0, Q4_K, Q5_K and Q6_K kernels against float64 arithmetic on the weights
as torch dequantizes them (itself checked bit for bit against gguf's reference in
test_gguf.py), on the AVX2 path and the portable one.

The kernels round x to int16 per block (csrc/linear.h: 32 values; the prompt kernels, named
*_x256 here, 256), which moves each x[i] by at most 0.51 s, s = max|x| over its
block / 32767; so an output may differ from the exact
product by at most sum_i |a[i]| * 0.51 s(i), with a = w except for Q4_K and Q5_K (d * sc * q: its
mins dmin * m go through the exact sum of x), plus fp32 rounding: one rounding per scale
product and per sum of 16-weight partials, at most (cols / 16 + 40) * 2**-24 of the sum of
the absolute terms. The tests allow exactly that bound.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf_fixtures as gf
from moeedge import _core
from moeedge.formats.gguf_quants import BLOCKS, dequantize
from moeedge.formats.quant_tensor import QuantTensor
from moeedge.kernels import linear, prompt_kernels_pay
from conftest import kernel_path

QUANTS = ("q4_0", "q4_k", "q5_k", "q6_k")
KERNELS = {"q4_0": _core.linear_q4_0, "q4_k": _core.linear_q4_k, "q5_k": _core.linear_q5_k,
           "q6_k": _core.linear_q6_k, "q4_k_x256": _core.linear_q4_k_x256,
           "q5_k_x256": _core.linear_q5_k_x256, "q6_k_x256": _core.linear_q6_k_x256}
NAMES = tuple(KERNELS)  # kernel names: a quant, or a quant's prompt kernel (_x256)


def quant_of(name: str) -> str:
    return name.removesuffix("_x256")


def x_block(name: str) -> int:
    """Values of x per int16 scale."""
    return 256 if name.endswith("_x256") else 32



def weights(quant: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(gf.random_blocks(quant, rows, cols, rng).reshape(-1).copy())


def mins(quant: str, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dmin * m part of each weight (Q4_K, Q5_K), found by dequantizing with every quant bit zeroed; 0 otherwise."""
    if quant not in ("q4_k", "q5_k"):
        return torch.zeros(shape)
    blocks = raw.clone().view(-1, BLOCKS[quant][1])
    blocks[:, 16:] = 0
    return -dequantize(blocks.reshape(-1), quant, shape, torch.float32)


def error_bound(quant: str, raw: torch.Tensor, x: torch.Tensor, rows: int, cols: int, block: int = 32) -> torch.Tensor:
    """[T, rows] what the module docstring allows; block: values of x per int16 scale."""
    w = dequantize(raw, quant, (rows, cols), torch.float64)
    m = mins(quant, raw, (rows, cols)).double()
    a = (w + m).abs()                                                  # the part multiplied by int16 x
    step = x.double().abs().view(len(x), -1, block).amax(-1) / 32767  # [T, cols / block]
    rounding = a @ (0.51 * step.repeat_interleave(block, dim=1)).T    # [rows, T]
    terms = (a + m.abs()) @ x.double().abs().T
    return (rounding + (cols / 16 + 40) * 2.0 ** -24 * terms).T.float()


def run(name: str, x: torch.Tensor, raw: torch.Tensor, rows: int, threads: int = 0) -> torch.Tensor:
    out = torch.empty(len(x), rows)
    KERNELS[name](x.numpy(), raw.numpy(), out.numpy(), threads)
    return out


SHAPES = [(1, 7, 256), (3, 33, 512), (16, 300, 1024), (3, 5, 1280)]  # (tokens, rows, cols); 300 x 1024 is threaded


@pytest.mark.parametrize("tokens, rows, cols", SHAPES + [(9, 21, 4608)])  # 4608: a chunk of 16 super-blocks and 2
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_on_the_dequantized_weights(path, name, tokens, rows, cols):
    quant = quant_of(name)
    raw = weights(quant, rows, cols, seed=rows + cols)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    x[0, :32] *= 50  # one block with a large activation: its rounding step is 50x the others'
    got = run(name, x, raw, rows)
    want = (x.double() @ dequantize(raw, quant, (rows, cols), torch.float64).T).float()
    excess = (got - want).abs() - error_bound(quant, raw, x, rows, cols, x_block(name))
    assert excess.max() <= 0, f"{name} {path}: {excess.max():.3g} over the bound"


@pytest.mark.parametrize("cols", [32, 96, 288])  # 1, 3 and 9 blocks: groups of 8 that end inside a row
def test_q4_0_rows_that_are_not_whole_256_weight_groups(path, cols):
    raw = weights("q4_0", 9, cols)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(cols))
    want = (x.double() @ dequantize(raw, "q4_0", (9, cols), torch.float64).T).float()
    assert ((run("q4_0", x, raw, 9) - want).abs() <= error_bound("q4_0", raw, x, 9, cols)).all()


@pytest.mark.parametrize("name", NAMES)
def test_paths_agree_within_float_rounding(name):
    # Both paths round x the same way and sum the same integers: only float rounding differs.
    quant, rows, cols = quant_of(name), 64, 2048
    raw = weights(quant, rows, cols, seed=1)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(1))
    outs = []
    for path in _core.linear_paths():
        with kernel_path(path):
            outs.append(run(name, x, raw, rows))
    w, m = dequantize(raw, quant, (rows, cols), torch.float64), mins(quant, raw, (rows, cols)).double()
    terms = ((w + m).abs() + m.abs()) @ x.double().abs().T
    for out in outs[1:]:
        assert ((out - outs[0]).abs() <= 2 * (cols / 16 + 40) * 2.0 ** -24 * terms.T.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_thread_count_does_not_change_the_result(name):
    rows, cols = 301, 512  # odd rows, split unevenly
    raw = weights(quant_of(name), rows, cols, seed=2)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(2))
    one = run(name, x, raw, rows, threads=1)
    for threads in (2, 3, 0):
        assert torch.equal(run(name, x, raw, rows, threads=threads), one), threads


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_activations_give_nan_not_garbage(name):
    raw = weights(quant_of(name), 4, 256)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    x[1, 40] = float("inf")
    x[2, 200] = float("nan")
    out = run(name, x, raw, 4)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


@pytest.mark.parametrize("quant", ["q4_k", "q5_k", "q6_k"])
def test_a_prompt_takes_the_prompt_kernels_where_they_pay(path, quant):
    raw = weights(quant, 24, 512, seed=6)
    w = QuantTensor(raw, quant, (24, 512))
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(6))
    pay = prompt_kernels_pay()
    assert pay == (path == "avx512" and _core.cpu_features()["avx512vnni"])
    assert torch.equal(linear(x, w, prompt=True), run(f"{quant}_x256" if pay else quant, x, raw, 24))
    assert torch.equal(linear(x, w), run(quant, x, raw, 24))


@pytest.mark.parametrize("quant", QUANTS)
def test_linear_dispatches_small_batches_to_the_kernel_and_large_ones_to_torch(quant):
    rows, cols = 24, 512
    raw = weights(quant, rows, cols, seed=4)
    w, bias = QuantTensor(raw, quant, (rows, cols)), torch.randn(rows)
    for tokens in (1, 16, 17):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        want = x.double() @ dequantize(raw, quant, (rows, cols), torch.float64).T + bias.double()
        got = linear(x, w, bias)
        tolerance = error_bound(quant, raw, x, rows, cols) + 1e-6 * bias.abs()
        assert ((got - want.float()).abs() <= tolerance).all(), tokens


@pytest.mark.parametrize("quant", QUANTS)
def test_embedding_rows_are_the_dequantized_rows(quant):
    raw = weights(quant, 10, 512, seed=5)
    w = QuantTensor(raw, quant, (10, 512))
    index = torch.tensor([7, 0, 7, 3])
    assert torch.equal(w.rows(index, torch.float32), w.dequantize(torch.float32)[index])


@pytest.mark.parametrize("quant", QUANTS)
def test_bad_arguments_are_refused(quant):
    block, block_bytes = BLOCKS[quant]
    fn, cols = KERNELS[quant], 2 * block
    x, out = np.zeros((1, cols), np.float32), np.zeros((1, 4), np.float32)
    need = 4 * 2 * block_bytes
    with pytest.raises(ValueError, match=rf"w holds {need - 1} bytes; {quant.upper()} \[4, {cols}\] needs {need}"):
        fn(x, np.zeros(need - 1, np.uint8), out)
    with pytest.raises(ValueError, match=rf"{quant.upper()} rows must hold whole {block}-weight blocks, got in = 40"):
        fn(np.zeros((1, 40), np.float32), np.zeros(need, np.uint8), out)
    with pytest.raises(ValueError, match="x has 2 tokens but out has 1"):
        fn(np.zeros((2, cols), np.float32), np.zeros(need, np.uint8), out)
    with pytest.raises(ValueError, match="4-byte items"):
        fn(np.zeros((1, cols), np.float64), np.zeros(need, np.uint8), out)
    with pytest.raises(ValueError, match="C-contiguous"):
        fn(x, np.zeros(2 * need, np.uint8)[::2], out)
