"""The C++ stress program (tests/cpp/stress_cache.cpp) under AddressSanitizer +
UndefinedBehaviorSanitizer and under ThreadSanitizer, built with CMake and run by
ctest. TSan under CPython itself is too noisy, so the engine is hammered from C++."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None,
    reason="cmake and ninja are needed (pip install '.[test]' brings both)")


def _ctest(tmp_path: Path, sanitize: str, options: str) -> str:
    build = tmp_path / f"build-{sanitize.replace(',', '-')}"
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DMOEEDGE_BUILD_TESTS=ON",
         "-DMOEEDGE_BUILD_PYTHON=OFF", f"-DMOEEDGE_SANITIZE={sanitize}",
         "-DCMAKE_BUILD_TYPE=RelWithDebInfo"],
        check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)
    env = dict(os.environ, ASAN_OPTIONS="halt_on_error=1:detect_leaks=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", TSAN_OPTIONS=options)
    run = subprocess.run(["ctest", "--output-on-failure", "-V"], cwd=build, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "WARNING: ThreadSanitizer" not in run.stdout + run.stderr
    assert "runtime error" not in run.stdout + run.stderr
    return run.stdout


@pytest.mark.slow
def test_stress_under_address_and_undefined_sanitizers(tmp_path):
    out = _ctest(tmp_path, "address,undefined", "")
    assert out.count("; ok") == 2  # buffered and O_DIRECT runs
    assert "stress_pool: ok" in out


@pytest.mark.slow
def test_stress_under_thread_sanitizer(tmp_path):
    out = _ctest(tmp_path, "thread", "halt_on_error=1")
    assert out.count("; ok") == 2
    assert "stress_pool: ok" in out
