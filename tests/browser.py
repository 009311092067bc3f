"""Headless Chromium for the page tests: one place that finds the browser, opens a page and collects its errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
# Playwright's default of 30 s for launching, loading, clicking and waiting is short on busy shared cores; these only
# bound a hang (a wait that runs out fails naming what it waited for).
TIMEOUT_MS = 180_000
# No background networking: this machine's closed network refuses Chromium's own connections.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class OpenPage:
    """A loaded page, the console/page errors it raised, the URLs it requested and the dialogs it opened."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@contextmanager
def chromium_page(path: Path, viewport: tuple[int, int] = (1360, 900)) -> Iterator[OpenPage]:
    """Open the file at `path` in headless Chromium (skips the test when Chromium or Playwright is missing)."""
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(TIMEOUT_MS)
            opened = OpenPage(page)
            page.on("console", lambda m: opened.errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: opened.errors.append(f"pageerror: {e}"))
            page.on("dialog", lambda d: (opened.dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: opened.requests.append(r.url))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            yield opened
        finally:
            browser.close()
