"""`python -m demo` / `python -m looplm demo`: argument wiring and readable failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gradio as gr

import demo.__main__ as cli

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_model_is_a_readable_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "looplm", "demo", "--model", str(tmp_path / "nope"), "--port", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_main_serves_the_checkpoint_on_localhost_only(tiny_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append((self, kw)))
    assert cli.main(["--model", tiny_checkpoint, "--port", "7999", "--concurrency", "3"]) == 0
    (app, kw), = calls
    assert kw["server_name"] == "127.0.0.1" and kw["server_port"] == 7999 and kw["share"] is False
    assert app._queue.default_concurrency_limit == 3
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
