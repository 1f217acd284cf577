"""An exported page in a real browser: the harness of its test and of benchmarks/web_flowers.py.

Debian's chromium, driven by Playwright (`pip install playwright`; never `playwright install`:
the system browser is used). PETAL_CHROMIUM may point at another Chromium binary.

    with serve_folder(page_dir) as url, chromium() as browser:
        page = open_page(browser, url)
        answers = classify(page, ["rose.jpg", "tulip.png"])   # [{"name", "label", "unknown", "error"}]
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return os.environ.get("PETAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a test pattern, allowed


@contextmanager
def chromium(extra_args: list[str] | None = None) -> Iterator[Any]:
    """A headless Chromium (a Playwright Browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS + (extra_args or []))
        try:
            yield browser
        finally:
            browser.close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A static server for `folder` on a free loopback port, in a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def open_page(browser: Any, url: str, timeout_s: float = 120, requests: list[str] | None = None) -> Any:
    """A fresh page (no cache shared with earlier ones) at `url`, once its model is loaded.
    The URL of every request it makes, from the first, is appended to `requests`."""
    page = browser.new_context().new_page()
    if requests is not None:
        page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1'], #status.bad", timeout=timeout_s * 1000)
    if page.get_attribute("body", "data-ready") != "1":
        raise RuntimeError(f"the page at {url} did not load its model: {page.inner_text('#status')}")
    return page


def classify(page: Any, files: list[str | Path], timeout_s: float = 600, until: int | None = None) -> list[dict]:
    """Feed `files` through the page's file input; their answers, in file order:
    {"name", "label" (the nearest class), "unknown", "error"}. `until`: wait for that many
    cards in all instead (e.g. after a camera snap), and return every card, newest first."""
    before = page.eval_on_selector_all("#results .card", "cs => cs.length")
    if files:
        page.set_input_files("#files", [str(f) for f in files])
    count = until or before + len(files)
    page.wait_for_function(f"document.querySelectorAll('#results .card').length === {count} && "
                           "!document.querySelector('#results .pending')", timeout=timeout_s * 1000)
    cards = page.eval_on_selector_all("#results .card", """cs => cs.map(c => ({
        name: c.querySelector('.name').textContent, label: c.dataset.label || null,
        unknown: c.dataset.unknown === '1',
        error: c.querySelector('.error') ? c.querySelector('.error').textContent : null}))""")
    return cards if until else cards[:len(files)]  # the newest batch comes first, in file order
