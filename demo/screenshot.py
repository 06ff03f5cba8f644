"""Regenerates the README screenshot: `python -m demo.screenshot [--model PATH] [--out docs/demo.png]`.

Serves the app from a thread on 127.0.0.1, drives it with Playwright on Debian's headless chromium
(never a downloaded browser), generates once in the chosen mode and saves a full-page screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(argv: list[str] | None = None) -> int:
    """Writes the screenshot; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m demo.screenshot", description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--mode", default="anytime")
    parser.add_argument("--prompt", default="It is a truth universally acknowledged that")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("error: Debian's chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2

    import looplm
    from playwright.sync_api import sync_playwright

    from .app import available_modes, build_app, launch

    if args.mode not in available_modes():
        print(f"error: mode {args.mode!r} is not available ({', '.join(available_modes())})", file=sys.stderr)
        return 2
    app = build_app(looplm.load(args.model))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port, block=False, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator(f'#mode input[value="{args.mode}"]').check()
            for elem, value in (("#prompt textarea", args.prompt), ("#max-new input[type=number]", str(args.max_new_tokens))):
                page.locator(elem).fill(value)
                page.locator(elem).press("Tab")
            page.locator("#generate").click()
            page.wait_for_selector(f'#stats .looplm-stats[data-state="done"][data-mode="{args.mode}"]')
            page.wait_for_selector("#plot img, #plot svg")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
