"""`python -m demo` / `python -m looplm demo`: argument wiring and readable failures."""

from __future__ import annotations

import os

import gradio as gr

import demo.__main__ as cli
import looplm.__main__ as looplm_cli


def test_a_missing_model_is_a_readable_error(tmp_path, capsys):
    # through `python -m looplm demo ...`, options first (they must reach the demo's own parser)
    assert looplm_cli.main(["demo", "--model", str(tmp_path / "nope"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and "Traceback" not in err


def test_main_serves_the_checkpoint_on_localhost_only(tiny_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append((self, kw)))
    assert cli.main(["--model", tiny_checkpoint, "--port", "7999", "--concurrency", "3"]) == 0
    (app, kw), = calls
    assert kw["server_name"] == "127.0.0.1" and kw["server_port"] == 7999 and kw["share"] is False
    assert app._queue.default_concurrency_limit == 3
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
