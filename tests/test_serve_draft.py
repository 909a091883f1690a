"""`moeedge serve --draft` is refused at startup, before anything loads, saying why
(moeedge.serve.speculative)."""
from __future__ import annotations

import pytest

from moeedge import cli


@pytest.mark.parametrize("draft", ["auto", "/models/some-draft"])
def test_serve_refuses_a_draft_before_loading_and_says_why(draft, tmp_path, capsys):
    missing = tmp_path / "no-such-model"  # were it loaded, the error would name the missing checkpoint
    rc = cli.main(["serve", str(missing), "--draft", draft, "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--draft {draft}: refused by moeedge serve" in err
    assert "continuous batching it cannot pay" in err and "moeedge run/chat --draft" in err
    assert str(missing) not in err


def test_serve_help_says_draft_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "--draft" in capsys.readouterr().out
