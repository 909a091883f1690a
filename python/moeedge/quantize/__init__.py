"""moeedge's own quantization: a decoder-only checkpoint's experts to group-wise int8 or
int4, written as a Hugging Face directory that `moeedge.load` reads like any other
(`moeedge quantize`).

- `writer`: reads the source expert by expert, quantizes, writes the shards and the
  quantization record, and measures the quality cost;
- `bits`: which experts get 8 bits and which 4 (--per-expert-bits auto), from their
  measured sensitivity on calibration text;
- `cli`: the command (only argparse at import).
"""
