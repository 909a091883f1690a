"""`moeedge serve --draft`: refused at startup, with the reason (docs/speculative.md, "Serving").

Speculative decoding here runs one sequence at a time: its verify pass is an exact step,
each position given the bits a one-token decode step would give it, and that step takes one
sequence (models/decoder.py). Inside continuous batching it would have to pay where one
sequence already does not: fully resident, k adapting measured 0.97x plain decoding on the
trained default model at acceptance 0.71 (bench/README.md, "Speculative decoding"), because
a verify pass computes the union of the experts its tokens route to. A batch's decode step
already shares each expert among its sequences (8 streams use 3.65 experts per generated
token against one stream's 8, bench/README.md, "Serving"), so drafted tokens would mostly add
rows to experts the step computes anyway, at the native kernel's cost per row (1.61x one
row's time for 2 rows, 2.76x for 8), plus the draft's steps for every sequence.
"""
from __future__ import annotations

REASON = ("speculative decoding runs one sequence at a time here (a verify pass is an exact step of one "
          "sequence), and inside continuous batching it cannot pay: a batch's decode step already shares each "
          "expert among its sequences, and even for one sequence it measured 0.97x plain decoding fully resident "
          "(docs/speculative.md, Serving). Serve without --draft, or use moeedge run/chat --draft")


def add_draft_argument(parser) -> None:
    parser.add_argument("--draft", default=None,
                        help="refused: speculative decoding is not used inside continuous batching (use it with "
                             "moeedge run/chat --draft)")


def refuse_draft(draft: str | None) -> None:
    """A ValueError (one line, exit 2) where serve is asked for a draft: before the model loads."""
    if draft is not None:
        raise ValueError(f"--draft {draft}: refused by moeedge serve: {REASON}")
