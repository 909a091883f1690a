"""The front page's promises that can rot: its test command is CI's, the pages it links
exist, and every section that moved off it landed somewhere."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 ".[test]" && pytest' in README
    assert 'pip install torch==2.13.0 ".[test]"\npytest' in ci


def test_every_page_named_exists():
    named = set(re.findall(r"`((?:docs|bench|python)/[\w./-]+\.md)`", README))
    assert {"docs/engine.md", "docs/cli.md", "docs/prediction.md", "docs/aggregation.md", "docs/quantization.md",
            "bench/README.md"} <= named
    assert all((ROOT / p).is_file() for p in named), named


def test_the_front_page_stays_short_and_its_speed_table_says_how_to_reproduce_it():
    assert len(README.splitlines()) < 200
    speed = README.split("## Speed on a real model", 1)[1].split("\n## ", 1)[0]
    assert "| Mixtral-8x7B | Q4_K_M | 8 GiB |" in speed and "| Mixtral-8x7B | Q4_K_M | 16 GiB |" in speed
    assert "moeedge bench matrix bench/matrix.toml --models mixtral-8x7b" in speed
