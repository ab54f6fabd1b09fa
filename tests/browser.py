"""A real browser for the web page's tests: the distribution's Chromium (apt-get install chromium; .ci/run does),
driven by Playwright through ``executable_path``, since Playwright's own browser download cannot be had here. On a
Mac, Google Chrome or Chromium in /Applications, or the browser of ``playwright install chromium``."""

import pytest

from benchmarks.live import CHROMIUM_HINT, find_chromium

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the page tests need Playwright (pip install -e '.[test]')"
)


def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(f"the page tests need Chromium ({CHROMIUM_HINT})")
    return path


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as pw:
        yield pw


def launch(playwright, *args: str):
    """Headless Chromium with extra command-line switches (a fake camera, say); the caller closes it."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=list(args))
