"""Helpers shared by the page tests (Debian chromium driven by Playwright); no tests here."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The example trusts' viewer and DICOMweb hosts are fictitious (*.example): answer them here.
EXAMPLE_HOSTS = re.compile(r"^https://[a-z0-9.-]+\.example/")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def need_chromium() -> None:
    """Skip without Debian's chromium, except in CI (LOCATOR_REQUIRE_POSTGRES=1): fail there."""
    if CHROMIUM.exists():
        return
    if os.environ.get("LOCATOR_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{CHROMIUM} is required in CI (apt-get install chromium)")
    pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")


def launch_browser() -> Iterator[Browser]:
    need_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


def _viewer_stub(route: Route) -> None:
    route.fulfill(status=200, content_type="text/html", body="<title>Trust viewer</title>")


def new_context(browser: Browser, width: int = 1280, height: int = 900) -> BrowserContext:
    context = browser.new_context(viewport={"width": width, "height": height})
    context.route(EXAMPLE_HOSTS, _viewer_stub)
    return context


def watch(page: Page) -> tuple[list[str], list[str]]:
    """Collect the page's script errors and the URLs it requests."""
    errors: list[str] = []
    urls: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: urls.append(request.url))
    return errors, urls


def focused(page: Page, expression: str = "el.id") -> str:
    return str(
        page.evaluate(f"(() => {{ const el = document.activeElement; return {expression}; }})()")
    )


def tab_until(page: Page, predicate: str, limit: int = 150) -> None:
    """Press Tab until the focused element satisfies a JS predicate over `el`."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(
            f"(() => {{ const el = document.activeElement; return !!({predicate}); }})()"
        ):
            return
    raise AssertionError(f"Tab never reached an element where {predicate}")
