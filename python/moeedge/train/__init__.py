"""How moeedge's bundled default model is made: a small Mixtral trained on CPython's
standard library sources, dense first, then sparsely upcycled into an MoE.

    python -m moeedge.train.default_model --out DIR [--minutes 45] [--seed 0] [--resume]

`corpus` collects and splits the sources and trains the tokenizer, `default_model`
trains and writes the Hugging Face directory, `model_card` measures it and writes its
README. Training needs transformers (the `[test]` extra); running the model does not.
"""
