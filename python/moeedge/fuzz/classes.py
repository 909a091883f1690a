"""The input classes by name (and by the letter the issue gives them), and generate():
input `index` of a class is drawn from a random.Random seeded by (seed, class, index),
so the same seed gives the same inputs and any one input can be made again alone."""
from __future__ import annotations

import random

from moeedge.fuzz import gguf_inputs, hf_inputs, templates
from moeedge.fuzz.inputs import FuzzInput
from moeedge.fuzz.seeds import Seeds

# name -> generator(rng, seeds) -> FuzzInput (its cls and index set by generate)
CLASSES = {"safetensors": hf_inputs.safetensors_input, "index": hf_inputs.index_input,
           "config": hf_inputs.config_input, "tokenizer": hf_inputs.tokenizer_input,
           "gguf": gguf_inputs.gguf_input, "template": templates.template_input}
LETTERS = {"a": "safetensors", "b": "index", "c": "config", "d": "tokenizer", "e": "gguf", "f": "template"}
CLASS_NAMES = tuple(CLASSES)


def generate(cls: str, seed: int, index: int, seeds: Seeds) -> FuzzInput:
    rng = random.Random(f"{seed}/{cls}/{index}")
    inp = CLASSES[cls](rng, seeds)
    inp.cls, inp.index = cls, index
    return inp
