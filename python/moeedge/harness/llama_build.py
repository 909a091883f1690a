"""Which llama.cpp the harness compares against, and whether it was built for this CPU.

A llama.cpp built without the CPU's wider instructions (a portable AVX2 build on an
AVX-512 machine) decodes at half the speed of one built for it (../shared/MACHINE.md), so a
ratio against it flatters moeedge. llama.cpp reports the instruction sets it was compiled
with (llama_print_system_info: "CPU : AVX2 = 1 | AVX512 = 1 | ..."); every one this CPU
has must be there, except AMX, which is off on purpose (its quantized path crashes:
ggml-org/llama.cpp#20824). Build one with GGML_NATIVE=ON (bench/README.md) and name its
interpreter in the matrix's settings (llama_cpp_python).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# /proc/cpuinfo flag -> the name llama.cpp's CPU backend reports it under (ggml-cpu.cpp)
FEATURES = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
            "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
            "avx512_bf16": "AVX512_BF16"}

_PROBE = ("import json, llama_cpp, llama_cpp.llama_cpp as c; print(json.dumps({'version': llama_cpp.__version__, "
          "'module': llama_cpp.__file__, 'lib': getattr(getattr(c, '_lib', None), '_name', None), "
          "'system_info': llama_cpp.llama_print_system_info().decode(errors='replace').strip()}))")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def compiled_features(system_info: str) -> set[str]:
    """The features llama.cpp's CPU backend says it was built with ("AVX2 = 1")."""
    cpu = system_info.split("CPU :", 1)[1] if "CPU :" in system_info else ""
    pairs = (item.partition("=") for item in cpu.split("|"))
    return {name.strip() for name, _, value in pairs if value.strip() == "1"}


def missing_features(system_info: str, flags: set[str]) -> list[str]:
    """Instruction sets this CPU has that the build does not use."""
    built = compiled_features(system_info)
    return sorted(name for flag, name in FEATURES.items() if flag in flags and name not in built)


def describe(python: str | None = None) -> dict:
    """The llama.cpp that `python` (default: this interpreter) imports: version, module and
    library paths, its system_info, the CPU's flags and what the build lacks of them.
    ValueError where it cannot be imported."""
    python = python or sys.executable
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
        build = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise ValueError(f"llama.cpp (llama_cpp) does not import with {python}: {detail.strip()[-300:]}") from None
    flags = cpu_flags()
    build.update(python=python, cpu_flags=sorted(f for f in FEATURES if f in flags),
                 missing=missing_features(build["system_info"], flags))
    return build


def check_native(build: dict) -> None:
    """ValueError where the build lacks instruction sets this CPU has."""
    if build["missing"]:
        raise ValueError(f"the llama.cpp that {build['python']} imports ({build['lib'] or build['module']}) was not "
                         f"built for this CPU: it lacks {', '.join(build['missing'])}; build llama-cpp-python with "
                         f"CMAKE_ARGS='-DGGML_NATIVE=ON -DGGML_AMX_INT8=OFF' (bench/README.md) and set "
                         f"llama_cpp_python in the matrix's [settings] to its interpreter")
