"""One transformers decode measurement, the way a transformers user fits a model into
less memory than it needs: accelerate's disk offload (`device_map="auto"`, `max_memory`,
`offload_folder`). Printed as one JSON object in the shape of `python -m moeedge.decode_bench`.
Encoder-decoder models (Switch) run as moeedge runs them: the prompt through the encoder,
then greedy decoding from the decoder's start token.

    python -m moeedge.harness.transformers_decode HF_DIR [--max-memory BYTES] [--tokens 32]

Without --max-memory the model loads whole, as transformers does by default.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from moeedge.decode_bench import latency_summary, prompt_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeedge.harness.transformers_decode")
    parser.add_argument("source")
    parser.add_argument("--max-memory", type=int, default=None, help="bytes of CPU memory for weights")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-context", type=int, default=1024, help="accepted for the harness; the cache grows")
    args = parser.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    offload = tempfile.TemporaryDirectory(prefix="moeedge-offload-", dir="/var/tmp")
    kwargs = {"dtype": torch.bfloat16}
    if args.max_memory is not None:
        kwargs.update(device_map="auto", max_memory={"cpu": args.max_memory}, offload_folder=offload.name)
    seq2seq = transformers.AutoConfig.from_pretrained(args.source).is_encoder_decoder
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    start = time.perf_counter()
    model = auto.from_pretrained(args.source, **kwargs).eval()
    load_s = time.perf_counter() - start
    prompt = torch.tensor([prompt_ids(model.config.vocab_size, args.prompt_tokens)])
    with torch.inference_mode():
        last = time.perf_counter()
        if seq2seq:  # as moeedge runs Switch: the prompt through the encoder, the decoder from its start token
            encoded = model.get_encoder()(input_ids=prompt)
            step = {"encoder_outputs": encoded}
            # T5's convention where the config names no start token: the pad token, else 0 (as moeedge reads it)
            first = getattr(model.config, "decoder_start_token_id", None)
            first = first if first is not None else getattr(model.config, "pad_token_id", None) or 0
            out = model(decoder_input_ids=torch.tensor([[first]]), use_cache=True, **step)
        else:
            step = {}
            out = model(input_ids=prompt, use_cache=True)
        prefill_s = time.perf_counter() - last
        token = int(out.logits[0, -1].argmax())
        generated, times, cache = [token], [], out.cache
        for _ in range(args.tokens - 1):
            last = time.perf_counter()
            ids = {"decoder_input_ids" if seq2seq else "input_ids": torch.tensor([[token]])}
            out = model(**ids, cache=cache, use_cache=True, **step)
            times.append(time.perf_counter() - last)
            token, cache = int(out.logits[0, -1].argmax()), out.cache
            generated.append(token)
    offload.cleanup()
    print(json.dumps({
        "engine": "transformers", "source": args.source, "threads": args.threads, "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens, **latency_summary(times),
        "prefill_tok_s": args.prompt_tokens / prefill_s, "load_s": load_s, "generated": generated,
        "max_memory": args.max_memory, "version": transformers.__version__,
        "offloaded": sorted({d for d in getattr(model, "hf_device_map", {}).values() if d != "cpu"}),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
