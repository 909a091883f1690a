"""One llama.cpp decode measurement through llama-cpp-python, printed as one JSON object
in the shape of `python -m moeedge.decode_bench`: the harness runs it in the same memory
cgroup as moeedge, on the same weights, from the same prompt.

    python -m moeedge.harness.llama_cpp_decode MODEL.gguf [--tokens 32] [--threads 2]

llama-cpp-python is a benchmark dependency, not a test one: it builds from source
(about 4 minutes on 2 cores; build it for the machine, see bench/README.md). It may live
in another environment than moeedge: this file then runs as a script under that
environment's interpreter (the matrix's llama_cpp_python setting) and needs only numpy,
llama_cpp and moeedge/decode_measures.py beside its package. LLAMA_CPP_LIB_PATH points
llama_cpp at a libllama built elsewhere.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    from moeedge.decode_measures import latency_summary, prompt_ids, storage_read_bytes
except ImportError:  # run as a file by an interpreter without moeedge
    _spec = importlib.util.spec_from_file_location("decode_measures", Path(__file__).parents[1] / "decode_measures.py")
    _measures = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_measures)
    latency_summary, prompt_ids, storage_read_bytes = (_measures.latency_summary, _measures.prompt_ids,
                                                       _measures.storage_read_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.harness.llama_cpp_decode")
    parser.add_argument("gguf")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-context", type=int, default=1024, help="n_ctx (default 1024)")
    parser.add_argument("--no-repack", action="store_true",
                        help="weights stay in the mapped file (llama-cli --no-repack); by default llama.cpp copies "
                             "the ones it repacks (Q4_0, Q4_K, ...) into anonymous memory, all of them")
    args = parser.parse_args(argv)
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if args.no_repack:  # Llama() takes no use_extra_bufts: its default parameters are patched instead
        defaults = lib.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params
        lib.llama_model_default_params = no_repack

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
        "engine": "llama.cpp-norepack" if args.no_repack else "llama.cpp", "source": args.gguf, "threads": args.threads, "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens, **latency_summary(times),
        "prefill_tok_s": args.prompt_tokens / prefill_s, "load_s": load_s, "generated": generated,
        "decode_read_bytes": storage_read_bytes() - read_before,
        "version": llama_cpp.__version__, "python": sys.executable, "module": llama_cpp.__file__,
        "lib": getattr(getattr(lib, "_lib", None), "_name", None), "repack": not args.no_repack,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
