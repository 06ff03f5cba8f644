"""`python -m looplm serve --tp 2` (a subprocess): rank 0 serves, the rank it spawns computes its half.

The official openai client gets the single-process answers; SIGTERM exits 0 and leaves no process
behind; a worker that dies stops the server with a message naming it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL, PROMPTS, client_for, free_socket

ROOT = Path(__file__).resolve().parents[2]
START_S = 90  # the server and its spawned rank import torch and load the model (slow on 2 busy cores)
NEW = 8


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its new parent has not reaped it yet)


def _start(tmp_path: Path):
    """Starts `serve --tp 2` on a free port; returns (process, base URL, log path) once /health answers."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again (SO_REUSEADDR), a moment later
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "looplm", "serve", "--tp", "2", "--threads", "1", "--port", str(port), "--grace-period", "5"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve --tp 2 did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen, pids: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in pids:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


def test_serve_tp_2_answers_as_one_process_and_sigterm_stops_every_rank(tmp_path, engine, client):
    proc, url, log = _start(tmp_path)
    pids = _children(proc.pid)
    try:
        assert pids, "no worker rank was spawned"
        tp_client = client_for(url)
        for prompt in random.sample(PROMPTS, 2):
            want = engine.generate(prompt, max_new_tokens=NEW, temperature=0)
            got = tp_client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=2)
            assert got.choices[0].text == want.text
            # the log-probabilities come from a no-cache forward that every rank takes part in
            ref = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0, logprobs=2)
            assert got.choices[0].logprobs.tokens == ref.choices[0].logprobs.tokens
            assert got.choices[0].logprobs.token_logprobs == pytest.approx(ref.choices[0].logprobs.token_logprobs, abs=1e-4)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        left = _wait_gone(pids)
    finally:
        _stop(proc, pids)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert left == [], f"processes left after SIGTERM: {left}"
    assert "Traceback" not in text


def test_a_dead_rank_stops_the_server_naming_it(tmp_path):
    proc, url, log = _start(tmp_path)
    pids = _children(proc.pid)
    try:
        worker = next(p for p in pids if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text())
        os.kill(worker, signal.SIGKILL)
        rc = proc.wait(30)
        left = _wait_gone(pids)
    finally:
        _stop(proc, pids)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert f"error: tensor-parallel rank 1 (pid {worker}) exited with status -9" in text
    assert left == []


@pytest.mark.parametrize("args,message", [
    (["--tp", "4"], "num_key_value_heads=2 is not divisible by 4"),  # the bundled model: 2 KV heads
    (["--tp", "0"], "--tp must be an integer >= 1, got 0"),
    (["--tp", "2", "--dtype", "float8"], "unsupported dtype 'float8'"),
    (["--tp", "2", "--threads", "0"], "threads must be an integer >= 1, got 0"),
])
def test_a_bad_tp_exits_2_before_spawning(capsys, args, message):
    from looplm.__main__ import main

    before = set(_children(os.getpid()))
    assert main(["serve", *args]) == 2
    assert message in capsys.readouterr().err
    assert set(_children(os.getpid())) <= before
