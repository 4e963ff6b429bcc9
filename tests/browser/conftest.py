"""Browser tests: the real ComfyUI frontend (served by the session's
``comfy_server``) in Debian's headless Chromium through Playwright.

Skipped when Playwright or /usr/bin/chromium is missing, unless
MPOD3D_REQUIRE_BROWSER=1 (then they fail). Never runs `playwright install`.
"""

from __future__ import annotations

import pytest

from harness.browser import ComfyPage, browser_unavailable_reason, launch_browser
from harness.require import require_or_skip


@pytest.fixture(scope="session")
def browser():
    reason = browser_unavailable_reason()
    if reason:
        require_or_skip("MPOD3D_REQUIRE_BROWSER", reason)
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        b = launch_browser(pw)
    except Exception as e:  # a broken Chromium is a failure of the setup, not a skip
        pw.stop()
        pytest.fail(f"Chromium failed to launch: {e}", pytrace=False)
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="session")
def comfy_page(comfy_server, browser):
    """The frontend page, opened once per session. ``comfy_page.baseline``
    holds the errors the empty page logged (the frontend's own)."""
    # No templates dialog over the graph (user setting, POST /settings/{id}).
    comfy_server.set_setting("Comfy.TutorialCompleted", True)
    page = ComfyPage.open(browser, comfy_server.url)
    page.baseline = list(page.events)
    yield page
    page.page.close()
