"""Browser tests: Playwright driving Debian's Chromium against real servers of the service.

Chromium comes from the distribution (``scripts/install-chromium``, which ``make test`` runs),
not from Playwright's own download. Every request a page makes to anything but this machine is
aborted and recorded, so a page that needs the internet fails its test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from service.settings import PRETRAINED_DIR
from tests.servers import ROOT, ServerProcess

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
API_KEY = "demo-test-key"
TIMEOUT_MS = 60_000  # the longest a page waits (a loaded machine parses Swagger UI slowly); passing tests take seconds

expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Watched:
    """A page, with what it tried to fetch from elsewhere ("<resource type> <url>") and every error it raised or logged."""

    page: Page
    blocked: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one module's tests. Not longer: while Playwright's sync API runs, an event loop
    counts as running in this thread, and the suite's async tests after these could not start theirs."""
    if not CHROMIUM.exists():
        message = f"no Chromium at {CHROMIUM}: scripts/install-chromium (run by `make test`) installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


def keep_local(blocked: list[str]) -> Callable[[Route], None]:
    """A route handler that lets requests to this machine through and aborts (and records) any other."""

    def handle(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            blocked.append(f"{route.request.resource_type} {url}")
            route.abort()

    return handle


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Watched]]:
    """``open_page(url, viewport=..., **context_options)``: a fresh context and page, loaded, offline but for localhost."""
    contexts: list[BrowserContext] = []

    def open_(url: str, viewport: dict[str, int] = DESKTOP, **options) -> Watched:
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        watched = Watched(page)
        context.route("**/*", keep_local(watched.blocked))
        page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
        page.on("console", lambda msg: watched.console_errors.append(msg.text) if msg.type == "error" else None)
        page.goto(url)
        return watched

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture(scope="session")
def demo_server() -> Iterator[ServerProcess]:
    """The service on the shipped default model alone, so that recognition in the browser is the real model's."""
    server = ServerProcess({"NTM_MODELS": str(PRETRAINED_DIR), "NTM_ACCESS_LOG": "false"})
    try:
        yield server.wait_ready(timeout=120)
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def keyed_server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """The service with API keys on (a small model: these tests are about the key, not recognition)."""
    server = ServerProcess({"NTM_MODELS": str(tiny_checkpoint), "NTM_API_KEYS": API_KEY, "NTM_ACCESS_LOG": "false"})
    try:
        yield server.wait_ready(timeout=120)
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


def save_screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    """A screenshot (of the whole page, or of what the viewport shows), kept under test-artifacts/
    (git ignores it) for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path
