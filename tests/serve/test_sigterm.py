"""SIGTERM: the server stops accepting, finishes the requests it accepted within the grace period,
cancels the rest and exits 0 (a subprocess: `tests/serve/slow_server.py`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .conftest import MODEL, metric

ROOT = Path(__file__).resolve().parents[2]
GRACE_S, DELAY_S = 8.0, 0.1  # each stream holds every engine step 0.1 s: with three running a short request
# (8 tokens) needs ~3 s, the long one (400 tokens) 40 s or more
SHORT, LONG = 8, 400


def _stream(url: str, prompt: str, max_tokens: int, out: dict, first: threading.Event) -> None:
    """Streams one completion with raw SSE (no retries), recording its data lines and how it ended."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    lines = out.setdefault("lines", [])
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first.set()
    except httpx.HTTPError as e:  # the long request is cut at the end of the grace period
        out["error"] = type(e).__name__
    finally:
        first.set()


def test_sigterm_finishes_accepted_requests_and_exits_0(engine):
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve.slow_server", str(GRACE_S), str(DELAY_S)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.1)
        prompts = ["Elizabeth was", "def quicksort(items):", "She had never", "import os\n"]
        sizes = [LONG, SHORT, SHORT, SHORT]  # three run at once (--max-running 3): the last one waits in the queue
        results = [{} for _ in prompts]
        firsts = [threading.Event() for _ in prompts]
        threads = [threading.Thread(target=_stream, args=(url, p, n, out, ev)) for p, n, out, ev in zip(prompts, sizes, results, firsts)]
        for t in threads[:3]:
            t.start()
        assert all(ev.wait(30) for ev in firsts[:3])
        threads[3].start()
        deadline = time.monotonic() + 10
        while metric(url, "looplm_requests_waiting") != 1:
            assert time.monotonic() < deadline, "the fourth request was not queued"
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = False
        try:
            httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            refused = True
        assert refused, "the server still accepted connections after SIGTERM"
        rc = proc.wait(timeout=GRACE_S + 20)
        took = time.monotonic() - sent
        for t in threads:
            t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = proc.stderr.read()
    assert rc == 0, log[-3000:]
    assert took < GRACE_S + 10  # the long request did not hold the shutdown past the grace period
    for prompt, out in zip(prompts[1:], results[1:]):  # the short ones, the queued one included: complete
        want = engine.generate(prompt, max_new_tokens=SHORT, temperature=0)
        assert out["status"] == 200 and out["lines"][-1] == "[DONE]", out
        chunks = [json.loads(x) for x in out["lines"][:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    long = results[0]  # cut when the grace period ran out: an error event ends its stream
    assert "[DONE]" not in long["lines"] and len(long["lines"]) < LONG
    assert json.loads(long["lines"][-1])["error"]["message"].startswith("the request was cancelled")
    assert log.count("status=200 mode=full tokens=8") == 3 and log.count("status=503") == 1  # one line per request
    assert "Traceback" not in log
