"""Acceptance test of the demo in a real browser: Playwright driving Debian's headless chromium.

The app runs as `python -m looplm demo --model TINY --port N` in a subprocess on 127.0.0.1.
Screenshots land in artifacts/demo/ (the CI artifact path).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from playwright.sync_api import Page, expect, sync_playwright  # a test dependency: missing means failing

import looplm
from demo.app import available_modes, defaults, make_run

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "demo"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.geteuid() != 0:  # apt cannot install it for us: say so instead of failing
            pytest.skip("Debian's chromium is not installed and this user cannot apt-get install it")
        pytest.fail("chromium is missing: scripts/setup.sh installs it (apt-get install chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _one_thread():
    # The machine is small and shared: one intra-op thread per decode is much faster than two fighting ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo_server") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "looplm", "demo", "--model", tiny_checkpoint, "--port", str(port), "--concurrency", "4"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not serve {url} within 60 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()  # bad input never reached the log as a crash


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return looplm.load(tiny_checkpoint)


def _open(browser, url: str) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#generate")
    return page


def _set(page: Page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number], #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")  # commit the value (Gradio reads it on change/blur)


def _submit(page: Page, *, mode: str, prompt: str, max_new: int, seed: int = 0, temperature: float = 0.0) -> None:
    page.locator(f'#mode input[value="{mode}"]').check()
    _set(page, "prompt", prompt)
    _set(page, "max-new", max_new)
    _set(page, "seed", seed)
    _set(page, "temperature", temperature)
    page.locator("#generate").click()


def _wait_done(page: Page, mode: str, stats_id: str = "stats") -> None:
    page.wait_for_selector(f'#{stats_id} .looplm-stats[data-state="done"][data-mode="{mode}"]')


def _tokens(page: Page, elem_id: str = "tokens") -> list[dict]:
    return page.eval_on_selector_all(
        f"#{elem_id} .looplm-out span.tok",
        "els => els.map(e => ({id: +e.dataset.tokenId, loops: +e.dataset.loops, reason: e.dataset.reason, "
        "label: getComputedStyle(e, '::after').content}))",
    )


def _expected(engine, mode: str, prompt: str, max_new: int, **controls):
    run = make_run(engine, available_modes(), **{**defaults(), **controls, "prompt": prompt, "max_new_tokens": max_new, "mode": mode})
    with _one_thread():
        return engine.generate(run.prompt, max_new_tokens=run.max_new_tokens, mode=run.mode, **run.options)


def test_each_mode_streams_coloured_tokens_and_stats(server, browser, engine, make_prompt):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    T, rng = engine.config.total_ut_steps, random.Random()
    modes = available_modes()
    assert modes[0] == "full"
    page = _open(browser, server)
    for mode in modes:
        prompt, max_new = make_prompt(rng, rng.randint(3, 8)), rng.randint(8, 16)
        _submit(page, mode=mode, prompt=prompt, max_new=max_new)
        _wait_done(page, mode)
        want = _expected(engine, mode, prompt, max_new)
        got = _tokens(page)
        assert len(got) == len(want.tokens) == max_new  # one coloured span per generated token
        assert page.locator("#tokens .looplm-out .prompt").inner_text() == prompt
        assert [t["id"] for t in got] == want.tokens, (mode, prompt, page.locator("#stats").inner_text(), [t["loops"] for t in got], want.loops)
        assert [t["loops"] for t in got] == want.loops
        assert all(1 <= t["loops"] <= T and t["label"] == f'"{t["loops"]}"' for t in got)  # visible loop label
        stats = page.locator("#stats .looplm-stats")
        assert stats.get_attribute("data-tokens") == str(max_new)
        expect(stats).to_contain_text("tokens/s")
        expect(stats).to_contain_text("mean loops")
        if mode == "speculative":
            expect(stats).to_contain_text("acceptance")
            assert {t["reason"] for t in got} <= {"draft", "verify"}
            assert page.locator("#tokens span.tok.verify").count() == sum(t["reason"] == "verify" for t in got) >= 1
        expect(page.locator("#plot img, #plot svg").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / f"{mode}.png"), full_page=True)

    # the compare tab: full depth and the last mode, side by side, with their speeds
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare").click()
    page.wait_for_selector("#compare-summary .looplm-compare")
    _wait_done(page, "full", "compare-full-stats")
    _wait_done(page, modes[-1], "compare-mode-stats")
    assert len(_tokens(page, "compare-full-tokens")) == len(_tokens(page, "compare-mode-tokens")) == max_new
    expect(page.locator("#compare-summary")).to_contain_text("tokens/s")
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.context.close()


def test_bad_input_shows_a_message_and_the_app_keeps_serving(server, browser, engine, make_prompt):
    page = _open(browser, server)
    message = page.locator("#message .looplm-message.error")
    _submit(page, mode="full", prompt="   ", max_new=4)
    expect(message).to_contain_text("prompt is empty")
    ctx = engine.config.max_position_embeddings
    _submit(page, mode="full", prompt=make_prompt(random.Random(), ctx + 5), max_new=4)
    expect(message).to_contain_text(f"context holds {ctx}")
    if "anytime" in available_modes():
        page.locator('#mode input[value="anytime"]').check()
        _set(page, "prompt", "the cat sat")
        _set(page, "budget", 1e12)
        page.locator("#generate").click()
        expect(message).to_contain_text("Budget")
        _set(page, "budget", 0)
    expect(page.locator("text=Traceback")).to_have_count(0)
    _submit(page, mode="full", prompt="the cat sat", max_new=5)  # still serving, and the message clears
    _wait_done(page, "full")
    assert len(_tokens(page)) == 5
    expect(page.locator("#message .looplm-message")).to_have_attribute("data-state", "ok")
    page.context.close()


def test_two_concurrent_sessions_get_their_own_output(server, browser, engine, make_prompt):
    rng = random.Random()
    pages = [_open(browser, server) for _ in range(2)]
    inputs = [dict(prompt=make_prompt(rng, 4 + i), max_new=40, seed=rng.randint(0, 10**6), temperature=0.9)
              for i in range(2)]
    for page, inp in zip(pages, inputs):
        page.locator('#mode input[value="full"]').check()
        for key in ("prompt", "seed", "temperature"):
            _set(page, {"prompt": "prompt", "seed": "seed", "temperature": "temperature"}[key], inp[key])
        _set(page, "max-new", inp["max_new"])
    for page in pages:  # both requests are in flight together
        page.locator("#generate").click()
    for page, inp in zip(pages, inputs):
        _wait_done(page, "full")
        want = _expected(engine, "full", inp["prompt"], inp["max_new"], seed=inp["seed"], temperature=inp["temperature"])
        assert [t["id"] for t in _tokens(page)] == want.tokens
    assert [t["id"] for t in _tokens(pages[0])] != [t["id"] for t in _tokens(pages[1])]
    pages[0].screenshot(path=str(ARTIFACTS / "session-1.png"), full_page=True)
    for page in pages:
        page.context.close()
