"""`python -m looplm serve`: options reach the server, and bad ones fail with a message, before listening."""

from __future__ import annotations

import pytest

from looplm.__main__ import main


@pytest.mark.parametrize("args,message", [
    (["--max-running", "0"], "max_running must be >= 1"),
    (["--max-queue", "-1"], "max_queue >= 0"),
    (["--model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
])
def test_bad_options_exit_2_with_a_message(capsys, args, message):
    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--host", "--port", "--max-running", "--max-queue", "--api-key", "--grace-period"):
        assert option in out
