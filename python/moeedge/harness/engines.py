"""The engines the harness compares, each as the command that decodes once and prints one
JSON object (decode_tok_s, p50_ms, p99_ms, prefill_tok_s, generated, ...)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# name -> (what it runs, the precisions it takes). "bf16" runs the Hugging Face directory
# (llama.cpp: its GGUF BF16 conversion); other precisions run the model's GGUF of that type.
ENGINES = {
    "moeedge": "moeedge as loaded by default: the default predictor feeds eviction, no early reads",
    "moeedge-lru": "moeedge with LRU eviction, no predictor",
    "moeedge-prefetch": "moeedge with the default predictor and policy, guesses also read early",
    "moeedge-naive": "moeedge with the smallest cache and no prefetch: every expert read on demand",
    "llama.cpp": "llama.cpp through llama-cpp-python, mmap on (its default)",
    "llama.cpp-norepack": "llama.cpp with weight repacking off (llama-cli --no-repack): by default it copies the "
                          "weights it repacks (Q4_0, Q4_K, ...) out of the mapped file into anonymous memory, "
                          "so a Q4_K_M model larger than the limit is OOM-killed",
    "transformers": "transformers; under a limit, accelerate's disk offload",
}
HF_ONLY = ("transformers",)
GGUF_ONLY = ("llama.cpp", "llama.cpp-norepack")

# What transformers' weights may take under a limit: the rest is the process (Python,
# torch, transformers: about 600 MiB here) and the KV cache. A user would have to guess it.
TRANSFORMERS_HEADROOM = 640 << 20


@dataclass(frozen=True)
class Run:
    model: str
    engine: str
    precision: str
    limit_label: str
    limit_bytes: int | None   # None: unlimited
    source: str               # the directory or file the engine loads
    files: tuple[str, ...]    # what to evict from the page cache before the run
    prompt_tokens: int | None = None  # a prefill cell's prompt length; None: the matrix's settings'


def command(run: Run, tokens: int, prompt_tokens: int, threads: int, max_context: int,
            llama_cpp_python: str = "") -> list[str]:
    """The run's command line. llama_cpp_python: an interpreter whose llama_cpp is built for this
    machine (moeedge.harness.llama_build), which then runs llama_cpp_decode.py as a file; "" for this one."""
    common = ["--tokens", str(tokens), "--prompt-tokens", str(prompt_tokens), "--threads", str(threads),
              "--max-context", str(max_context)]
    py = [sys.executable, "-m"]
    if run.engine.startswith("moeedge"):
        budget = "min" if run.engine == "moeedge-naive" else str(run.limit_bytes) if run.limit_bytes else "auto"
        extra = {"moeedge": ["--policy", "auto", "--predictor", "auto"], "moeedge-lru": ["--policy", "lru"],
                 "moeedge-naive": ["--policy", "lru"],
                 "moeedge-prefetch": ["--prefetch", "--policy", "auto", "--predictor", "auto"]}[run.engine]
        return py + ["moeedge.decode_bench", run.source, "--memory-budget", budget, *extra, *common]
    if run.engine in GGUF_ONLY:
        common += ["--no-repack"] if run.engine == "llama.cpp-norepack" else []
        if llama_cpp_python:
            return [llama_cpp_python, str(Path(__file__).with_name("llama_cpp_decode.py")), run.source, *common]
        return py + ["moeedge.harness.llama_cpp_decode", run.source, *common]
    if run.engine == "transformers":
        extra = [] if run.limit_bytes is None else [
            "--max-memory", str(max(run.limit_bytes // 4, run.limit_bytes - TRANSFORMERS_HEADROOM))]
        return py + ["moeedge.harness.transformers_decode", run.source, *extra, *common]
    raise ValueError(f"unknown engine {run.engine!r}; choose from {', '.join(ENGINES)}")
