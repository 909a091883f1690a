"""One llama.cpp decode measurement through llama-cpp-python, printed as one JSON object
in the shape of `python -m moeedge.decode_bench`: the harness runs it in the same memory
cgroup as moeedge, on the same weights, from the same prompt.

    python -m moeedge.harness.llama_cpp_decode MODEL.gguf [--tokens 32] [--threads 2]

llama-cpp-python is a benchmark dependency, not a test one: it builds from source
(about 4 minutes on 2 cores), see bench/README.md. LLAMA_CPP_LIB_PATH points it at a
libllama built elsewhere.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from moeedge.decode_bench import latency_summary, prompt_ids, storage_read_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.harness.llama_cpp_decode")
    parser.add_argument("gguf")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-context", type=int, default=1024, help="n_ctx (default 1024)")
    args = parser.parse_args(argv)
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.max_context, n_threads=args.threads,
                          n_threads_batch=args.threads, use_mmap=True, verbose=False, seed=0)
    load_s = time.perf_counter() - start
    def next_token() -> int:
        # The last row of logits; llm.scores stays zero unless every row is kept (logits_all).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    prompt = prompt_ids(llm.n_vocab(), args.prompt_tokens)
    last = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - last
    token = next_token()
    generated, times = [token], []
    read_before = storage_read_bytes()  # the decode steps after the first token: what the bound covers
    for _ in range(args.tokens - 1):
        last = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - last)
        token = next_token()
        generated.append(token)
    print(json.dumps({
        "engine": "llama.cpp", "source": args.gguf, "threads": args.threads, "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens, **latency_summary(times),
        "prefill_tok_s": args.prompt_tokens / prefill_s, "load_s": load_s, "generated": generated,
        "decode_read_bytes": storage_read_bytes() - read_before,
        "version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
