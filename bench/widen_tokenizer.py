"""Give a random-weight checkpoint (python -m moeedge.synthetic) a tokenizer of its vocabulary
size: the bundled model's sentencepiece tokenizer.model (4,096 pieces) and its
tokenizer_config.json (chat template), with pieces "▁w4096", "▁w4097", ... appended up to the
checkpoint's vocab_size.

    python bench/widen_tokenizer.py /var/tmp/moeedge-models/mixtral-medium

Prompts encode as the bundled tokenizer encodes them (the added pieces score below every
other, and no prompt holds their text), and every id the random model samples decodes to
visible text, in moeedge and in llama.cpp (whose converter reads the same file), so a
streaming client sees a chunk per token. llama.cpp's convert_hf_to_gguf.py needs a
tokenizer.model beside the checkpoint; without one the ids above 4,095 would decode to
nothing."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

import moeedge

BUNDLED = Path(moeedge.__file__).parent / "models_data" / "default"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a Hugging Face directory with a config.json")
    args = p.parse_args(argv)
    vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((BUNDLED / "tokenizer.model").read_bytes())
    have = len(proto.pieces)
    if vocab < have:
        raise SystemExit(f"{args.checkpoint}: vocab_size {vocab} is below the bundled tokenizer's {have} pieces")
    lowest = min(piece.score for piece in proto.pieces)
    for i in range(have, vocab):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581w{i}", lowest - 1.0 - i, spm_pb2.ModelProto.SentencePiece.NORMAL
    (args.checkpoint / "tokenizer.model").write_bytes(proto.SerializeToString())
    shutil.copyfile(BUNDLED / "tokenizer_config.json", args.checkpoint / "tokenizer_config.json")
    print(f"{args.checkpoint}: tokenizer.model of {vocab} pieces ({have} bundled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
