"""Acceptance test of the demo in a real browser: Playwright driving Debian's headless chromium.

The app (on a tiny checkpoint saved with looplm.save) is served from a thread on 127.0.0.1.
Screenshots land in artifacts/demo/ (the CI artifact path).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright  # a test dependency: missing means failing

import looplm
from demo.app import available_modes, build_app, defaults, launch, make_run

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


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return looplm.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def served_engine(tiny_checkpoint):
    """The server's own engine, as `python -m demo` would load it (tests compare against `engine`)."""
    return looplm.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(served_engine, caplog_handler):
    """The app served from a thread of this process (the CLI path is tested in test_cli.py)."""
    app = build_app(served_engine, concurrency=4)
    port = _free_port()
    launch(app, port, block=False, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
        yield url
    finally:
        app.close()
    errors = [r for r in caplog_handler.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]  # no request crashed (bad input is not an error)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


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


def _submit(page: Page, *, mode: str, prompt: str, max_new: int, click: bool = True, **fields) -> None:
    """Fills the controls (fields: elem ids with "_" for "-", e.g. seed=3) and presses Generate."""
    page.locator(f'#mode input[value="{mode}"]').check()
    _set(page, "prompt", prompt)
    _set(page, "max-new", max_new)
    for key, value in fields.items():
        _set(page, key.replace("_", "-"), value)
    if click:
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
        depth = [s.exit_loop for s in want.steps]  # the loop each token was read out at
        assert [t["id"] for t in got] == want.tokens, (mode, prompt, page.locator("#stats").inner_text(), [t["loops"] for t in got], depth)
        assert [t["loops"] for t in got] == depth
        assert all(1 <= t["loops"] <= T and t["label"] == f'"{t["loops"]}"' for t in got)  # visible loop label
        stats = page.locator("#stats .looplm-stats")
        assert stats.get_attribute("data-tokens") == str(max_new)
        expect(stats).to_contain_text("tokens/s")
        expect(stats).to_contain_text("mean exit loop")
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
        _submit(page, mode="anytime", prompt="the cat sat", max_new=4, budget=1e12)
        expect(message).to_contain_text("Budget")
        _set(page, "budget", 0)
    expect(page.locator("text=Traceback")).to_have_count(0)
    _submit(page, mode="full", prompt="the cat sat", max_new=5)  # still serving, and the message clears
    _wait_done(page, "full")
    assert len(_tokens(page)) == 5
    expect(page.locator("#message .looplm-message")).to_have_attribute("data-state", "ok")
    page.context.close()


def test_two_concurrent_sessions_get_their_own_output(server, served_engine, browser, engine, make_prompt, caplog_handler):
    rng = random.Random()
    # every loop of the server's engine takes 5 ms more (same results): a decode then lasts about a
    # second, so the two clicks, a browser round trip apart, start decodes that overlap (the tiny
    # model alone decoded 48 tokens faster than that round trip on a fast machine)
    inner = served_engine.model.loop_body

    def slow_loop(*args, **kwargs):
        time.sleep(0.005)
        return inner(*args, **kwargs)

    served_engine.model.loop_body = slow_loop
    try:
        _two_sessions(server, browser, engine, make_prompt, caplog_handler, rng)
    finally:
        del served_engine.model.loop_body


def _two_sessions(server, browser, engine, make_prompt, caplog_handler, rng):
    pages = [_open(browser, server) for _ in range(2)]
    inputs = [dict(prompt=make_prompt(rng, 4 + i), max_new=48, seed=rng.randint(0, 10**6), temperature=0.9)
              for i in range(2)]
    for page, inp in zip(pages, inputs):
        _submit(page, mode="full", click=False, **inp)
    first = len(caplog_handler.records)
    for page in pages:  # both clicks within a few milliseconds, so the two decodes run at once
        page.evaluate("document.querySelector('#generate').click()")
    for page, inp in zip(pages, inputs):
        _wait_done(page, "full")
        want = _expected(engine, "full", inp["prompt"], inp["max_new"], seed=inp["seed"], temperature=inp["temperature"])
        assert [t["id"] for t in _tokens(page)] == want.tokens
        assert page.locator("#tokens .looplm-out .prompt").inner_text() == inp["prompt"]
    assert [t["id"] for t in _tokens(pages[0])] != [t["id"] for t in _tokens(pages[1])]
    events = [r.getMessage().split()[1] for r in caplog_handler.records[first:] if r.getMessage().startswith("decode ")]
    assert events == ["start", "start", "end", "end"], events  # the two decodes overlapped in time
    pages[0].screenshot(path=str(ARTIFACTS / "session-1.png"), full_page=True)
    for page in pages:
        page.context.close()
