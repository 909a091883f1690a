"""One llama.cpp decode measurement (through llama-cpp-python), printed as one JSON
object in the same shape as `python -m moeedge.decode_bench`: run it under the same
memory cgroup to compare the engines on the same weights.

    python bench/llama_cpp_decode.py MODEL.gguf [--tokens 32] [--threads 2]

llama-cpp-python is a benchmark dependency, not a test one: it builds from source
(about 4 minutes on 2 cores): `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`.
On CPUs with AMX build with -DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF and the AVX-512 flags
(ggml-org/llama.cpp#20824).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                use_mmap=True, verbose=False, seed=0)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, llm.n_vocab(), args.prompt_tokens)]
    times, last = [], time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - last
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    for _ in range(args.tokens - 1):
        last = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - last)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    print(json.dumps({
        "engine": "llama.cpp", "source": args.gguf, "threads": args.threads, "tokens": args.tokens,
        "decode_tok_s": 1 / statistics.median(times), "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * sorted(times)[min(len(times) - 1, int(0.99 * len(times)))],
        "prefill_tok_s": args.prompt_tokens / prefill_s, "load_s": load_s,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
