"""How moeedge's trained models are made, on CPython's standard library sources.

The bundled default model, a small Mixtral trained dense first, then sparsely upcycled:

    python -m moeedge.train.default_model --out DIR [--minutes 45] [--seed 0] [--resume]

A Switch Transformers encoder-decoder trained from scratch with T5's span corruption
(not shipped; benchmarks rebuild it):

    python -m moeedge.train.switch_model --out DIR [--minutes 45] [--seed 0] [--resume]

`corpus` collects and splits the sources and trains the tokenizer, `common` holds the
schedule, checkpoints and resume both trainers share, `default_model` and `switch_model`
train and write the Hugging Face directories (`span_corruption` makes the Switch
model's examples), `model_card` and `switch_card` measure them and write their READMEs.
Training needs transformers (the `[test]` extra); running the models does not.
"""
