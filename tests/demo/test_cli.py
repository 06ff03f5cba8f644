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


def test_a_taken_port_is_a_readable_error(tiny_checkpoint, monkeypatch, capsys):
    def taken(self, **kw):
        raise OSError(f"Cannot find empty port in range: {kw['server_port']}-{kw['server_port']}.")

    monkeypatch.setattr(gr.Blocks, "launch", taken)
    assert cli.main(["--model", tiny_checkpoint, "--port", "7999"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: Cannot find empty port in range: 7999-7999."]


def test_help_lists_options_with_defaults(capsys):
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--concurrency CONCURRENCY requests decoded at once, batched by the engine (default: 4)" in out
    assert "--threads" in out and "(default: the bundled model)" in out
