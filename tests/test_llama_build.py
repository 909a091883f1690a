"""The harness compares against a llama.cpp built for the CPU it runs on: what a build says
it was compiled with, what this CPU has that a build lacks, refusing such a build, and
running llama.cpp's measurement under another environment's interpreter."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moeedge.decode_measures import prompt_ids
from moeedge.harness import matrix
from moeedge.harness.engines import Run, command
from moeedge.harness.machine import cpu
from moeedge.harness.llama_build import check_native, compiled_features, cpu_flags, describe, missing_features

PORTABLE = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 |"
NATIVE = ("CPU : SSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
          "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")
AVX512_CPU = {"avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16",
              "amx_int8", "amx_tile"}


def test_what_a_build_lacks_of_the_cpu():
    assert {"AVX2", "FMA", "LLAMAFILE"} <= compiled_features(PORTABLE) and "SSE3" in compiled_features(NATIVE)
    assert missing_features(PORTABLE, AVX512_CPU) == ["AVX512", "AVX512_BF16", "AVX512_VBMI", "AVX512_VNNI", "AVX_VNNI"]
    assert missing_features(NATIVE, AVX512_CPU) == []  # AMX is off on purpose (ggml-org/llama.cpp#20824)
    assert missing_features(PORTABLE, {"avx", "avx2", "fma", "f16c", "bmi2"}) == []  # an AVX2 CPU: native
    assert missing_features("", {"avx2"}) == ["AVX2"]  # no CPU backend line: nothing is known built


def fake_python(tmp_path: Path, system_info: str) -> str:
    """An 'interpreter' that answers describe()'s probe as a llama.cpp build would."""
    script = tmp_path / "python"
    build = {"version": "0.3.36", "module": "/x/llama_cpp/__init__.py", "lib": "/x/libllama.so",
             "system_info": system_info}
    script.write_text(f"#!/bin/sh\necho '{json.dumps(build)}'\n")
    script.chmod(0o755)
    return str(script)


def test_describe_and_refuse_a_build_not_made_for_this_cpu(tmp_path):
    build = describe(fake_python(tmp_path, "CPU : SSE3 = 1 |"))
    assert build["lib"] == "/x/libllama.so" and build["python"].endswith("python")
    if not build["missing"]:
        pytest.skip("this CPU has none of the instruction sets the harness checks")
    assert set(build["missing"]) <= {"AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI",
                                     "AVX512_VNNI", "AVX512_BF16"}
    with pytest.raises(ValueError, match=r"not built for this CPU: it lacks .*GGML_NATIVE=ON"):
        check_native(build)


def test_describe_names_an_interpreter_without_llama_cpp(tmp_path):
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named llama_cpp' >&2\nexit 1\n")
    script.chmod(0o755)
    with pytest.raises(ValueError, match=r"does not import with .*python: ModuleNotFoundError"):
        describe(str(script))


def test_the_matrix_refuses_llama_cpp_runs_on_a_build_not_made_for_this_cpu(tmp_path):
    if not missing_features("CPU : SSE3 = 1 |", cpu_flags()):
        pytest.skip("this CPU has none of the instruction sets the harness checks")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "machine.json").write_text(json.dumps({
        "host": socket.gethostname(), "cpu": cpu(), "threads": 2, "disk_bytes_per_s": 1e9,
        "matvec_bytes_per_s": 1e10}))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 100)
    config = tmp_path / "m.toml"
    config.write_text(f"[settings]\ndisk_probe = false\nllama_cpp_python = '{fake_python(tmp_path, 'CPU : SSE3 = 1 |')}'\n"
                      f"[[model]]\nname='m'\nhf='{tmp_path}'\ngguf={{q8_0='{gguf}'}}\nprecisions=['q8_0']\n"
                      f"engines=['llama.cpp']\nlimits=['unlimited']\n")
    with pytest.raises(ValueError, match="not built for this CPU"):
        matrix.main_loop(config, tmp_path / "results", progress=False)
    assert not (tmp_path / "results" / "runs").exists()


def test_llama_cpp_runs_under_another_interpreter_as_a_file():
    run = Run("m", "llama.cpp", "q8_0", "unlimited", None, "/m.gguf", ("/m.gguf",))
    cmd = command(run, 8, 4, 2, 256, llama_cpp_python="/var/tmp/llama-venv/bin/python")
    assert cmd[0] == "/var/tmp/llama-venv/bin/python" and Path(cmd[1]).is_file() and cmd[2] == "/m.gguf"
    assert command(run, 8, 4, 2, 256)[:3] == [sys.executable, "-m", "moeedge.harness.llama_cpp_decode"]
    norepack = command(Run("m", "llama.cpp-norepack", "q8_0", "unlimited", None, "/m.gguf", ("/m.gguf",)), 8, 4, 2, 256)
    assert norepack[-1] == "--no-repack" and "--no-repack" not in cmd
    # Without moeedge importable, the file still finds the prompt every engine decodes from.
    code = ("import sys, runpy; sys.modules['moeedge'] = None; "
            f"g = runpy.run_path({cmd[1]!r}, run_name='probe'); print(g['prompt_ids'](32000, 16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == prompt_ids(32000, 16)
