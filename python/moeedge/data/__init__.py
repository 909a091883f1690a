"""Text that evaluation, quantization, aggregation and training all read: the corpus of
CPython standard-library sources with its train / held-out split and tokenizer
(`corpus`), and T5's span corruption of it for the Switch models (`span_corruption`)."""
