"""Compute threads: the kernels use the CPUs the process may run on (its affinity mask),
or fewer when the user says so (moeedge.load(threads=N), --threads N); the results do not
depend on how many."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import moeedge
from moeedge import _core
from moeedge.cli import main


def test_the_pool_is_the_affinity_mask():
    """A process pinned to one CPU (as taskset or a cpuset pins it) gets one kernel thread."""
    cpu = min(os.sched_getaffinity(0))
    code = "from moeedge import _core; print(_core.kernel_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert out.stdout.strip() == "1"
    assert _core.kernel_threads() == len(os.sched_getaffinity(0))


def test_a_limit_is_kept_and_bounded_by_the_pool(restore_threads):
    _core.set_kernel_threads(1)
    assert _core.kernel_threads() == 1
    _core.set_kernel_threads(10_000)
    assert _core.kernel_threads() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="threads must be 0 .* or more, got -1"):
        _core.set_kernel_threads(-1)


def test_one_thread_gives_the_same_products(restore_threads):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4096, 512), dtype=np.float32).view(np.int32) >> 16).astype(np.int16)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    every, one = np.empty((1, 4096), np.float32), np.empty((1, 4096), np.float32)
    _core.linear_bf16(x, w, every)
    _core.set_kernel_threads(1)
    _core.linear_bf16(x, w, one)
    assert np.array_equal(every, one)  # each row is one thread's whole sum


def test_load_sets_kernel_and_torch_threads(restore_threads):
    with moeedge.load(threads=1, max_context=64) as model:
        assert _core.kernel_threads() == 1 and torch.get_num_threads() == 1
        tokens = list(model.stream_ids([5, 9, 11], max_new_tokens=3, temperature=0))
    _core.set_kernel_threads(0)
    with moeedge.load(max_context=64) as model:
        assert list(model.stream_ids([5, 9, 11], max_new_tokens=3, temperature=0)) == tokens
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        moeedge.load(threads=0)


def test_cli_refuses_a_thread_count_below_one(capsys):
    assert main(["run", "--threads", "0", "--prompt", "hi"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
