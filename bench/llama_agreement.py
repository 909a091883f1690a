#!/usr/bin/env python
"""moeedge and llama.cpp on the same quantized GGUF, each against the exact model.

moeedge.synthetic_gguf writes a Q4_K_M (or Q8_0) Mixtral and its twin with every tensor
dequantized to F32 by gguf's reference (the same model, exactly). Both engines compute the
prompt's logits on both files; the twin run by torch (moeedge on F32) is the exact model.
Printed per prompt position: each engine's relative error ||logits - exact|| / ||exact||
on the quantized file, llama.cpp's on the twin (do the two engines read the model alike?),
and the greedy tokens. llama.cpp runs under --llama-python (an environment with
llama-cpp-python), weight repacking off so that a file larger than memory maps.

    python bench/llama_agreement.py --size medium --layers 4 --llama-python /var/tmp/llama-venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import moeedge
from moeedge.decode_measures import prompt_ids
from moeedge.synthetic_gguf import FTYPES, SIZES, write

LLAMA_LOGITS = """
import json, sys
import numpy as np
import llama_cpp, llama_cpp.llama_cpp as lib
defaults = lib.llama_model_default_params
def no_repack():
    p = defaults(); p.use_extra_bufts = False; return p
lib.llama_model_default_params = no_repack
ids = json.loads(sys.argv[2])
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=max(64, 2 * len(ids)), n_threads=2, n_threads_batch=2,
                      logits_all=True, verbose=False, seed=0)
llm.eval(ids)
rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(llm.n_vocab(),)).tolist()
        for i in range(len(ids))]
print(json.dumps({"logits": rows, "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def llama_logits(python: str, path: Path, ids: list[int]) -> torch.Tensor:
    out = subprocess.run([python, "-c", LLAMA_LOGITS, str(path), json.dumps(ids)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"llama.cpp on {path} failed: {out.stderr.strip()[-500:]}")
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])["logits"])


def moeedge_logits(path: Path, ids: list[int], prompt_kernels: bool = False) -> torch.Tensor:
    """Every position's logits as logits() computes them (a prompt's: the K-quants' products
    through the prompt kernels, moeedge.kernels.PROMPT_QUANTS), or with prompt_kernels False
    through the decode kernels, as a decode step's."""
    import moeedge.kernels as kernels

    pay = kernels.prompt_kernels_pay
    if not prompt_kernels:
        kernels.prompt_kernels_pay = lambda: False
    try:
        with moeedge.load(path, memory_budget="auto", threads=2) as model:
            return model.logits(torch.tensor(ids))
    finally:
        kernels.prompt_kernels_pay = pay


def relative(a: torch.Tensor, exact: torch.Tensor) -> str:
    return " ".join(f"{((a[i] - exact[i]).norm() / exact[i].norm()).item():.1e}" for i in range(len(exact)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--ftype", choices=sorted(FTYPES), default="q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--llama-python", default="/var/tmp/llama-venv/bin/python")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        quantized, exact_file = Path(tmp) / "q.gguf", Path(tmp) / "f32.gguf"
        write(quantized, args.size, args.ftype, args.layers, args.seed)
        write(exact_file, args.size, args.ftype, args.layers, args.seed, dequantized=True)
        ids = prompt_ids(SIZES[args.size][-1], args.prompt_tokens)
        exact = moeedge_logits(exact_file, ids)
        ours = moeedge_logits(quantized, ids)
        ours_prompt = moeedge_logits(quantized, ids, prompt_kernels=True)
        theirs = llama_logits(args.llama_python, quantized, ids)
        theirs_exact = llama_logits(args.llama_python, exact_file, ids)
    print(f"{args.size} {args.layers or SIZES[args.size][2]} layers {args.ftype}, prompt {ids}")
    print("relative error against the exact model, per prompt position")
    print(f"  moeedge   on {args.ftype:7}: {relative(ours, exact)}")
    print(f"  moeedge   on {args.ftype:7}, prompt kernels: {relative(ours_prompt, exact)}")
    print(f"  llama.cpp on {args.ftype:7}: {relative(theirs, exact)}")
    print(f"  llama.cpp on the F32 twin: {relative(theirs_exact, exact)}")
    print(f"greedy next tokens: exact {exact.argmax(-1).tolist()}")
    print(f"                    moeedge {ours.argmax(-1).tolist()}")
    print(f"   moeedge, prompt kernels {ours_prompt.argmax(-1).tolist()}")
    print(f"                    llama.cpp {theirs.argmax(-1).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
