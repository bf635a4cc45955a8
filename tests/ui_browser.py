"""Driving the web page in headless Chromium (Debian's package) through playwright's Python API."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest

# Flags that keep Chromium from calling out (this machine's network is closed) and let it run as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """The browser the tests drive; outside CI a machine without it skips them, in CI that fails."""
    path = os.environ.get("LOWMCGM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed: .ci/run installs Debian's chromium package.")
        pytest.skip("no Chromium here (apt-get install chromium); CI runs these tests")
    return path


# Playwright waits 30 s for an action by default. On CI's 2 cores a page beside another worker's
# training has taken longer than that to take a click (stop 31: "performing click action" on a
# visible, enabled button, then the timeout), so every action and wait on our pages may take up to
# 90 s: a wait ends as soon as what it waits for shows, so only a failure takes longer to report.
ACTION_TIMEOUT_MS = 90_000


def wait_ms(timeout_s: float) -> int:
    """A test's wait in milliseconds, never under ``ACTION_TIMEOUT_MS``."""
    return max(int(timeout_s * 1000), ACTION_TIMEOUT_MS)


def new_context(browser):
    """A browser context at the page's usual window size whose actions wait ``ACTION_TIMEOUT_MS``."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    return context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def canvas_point(page, elem: str, size: tuple[int, int], x: float, y: float) -> tuple[float, float]:
    """Screen position of image pixel (x, y) on an ImageEditor showing a ``size`` (w, h) image.

    The editor draws the image centred on its canvas at the zoom it shows (e.g. "300%").
    """
    box = page.locator(f"#{elem} canvas").first.bounding_box()
    zoom = float(re.search(r"(\d+)\s*%", page.locator(f"#{elem}").inner_text()).group(1)) / 100
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    return cx + (x - size[0] / 2) * zoom, cy + (y - size[1] / 2) * zoom


def bring_into_view(page, elem: str) -> None:
    """Scroll the whole canvas into the viewport: a stroke below its edge reaches no element, so
    ``tools/ui_screenshots.py`` painted only the rows of its masks that were in view (issue 24)."""
    page.locator(f"#{elem}").scroll_into_view_if_needed()


def paint_rect(page, elem: str, size: tuple[int, int], rect: tuple[int, int, int, int], step: int = 3) -> None:
    """Paint a rectangle (x0, y0, x1, y1 in image pixels) with horizontal brush strokes."""
    bring_into_view(page, elem)
    page.locator(f"#{elem} button[aria-label='Brush']").click()
    x0, y0, x1, y1 = rect
    for y in range(y0, y1 + 1, step):
        page.mouse.move(*canvas_point(page, elem, size, x0, y))
        page.mouse.down()
        page.mouse.move(*canvas_point(page, elem, size, x1, y), steps=8)
        page.mouse.up()


def text_of(page, elem: str) -> str:
    return page.locator(f"#{elem}").inner_text()


def wait_for_text(page, elem: str, pattern: str, timeout_s: float) -> str:
    """Wait until element ``elem``'s text matches ``pattern`` (a regex); return the text."""
    # The text returned is the one that matched, read in the same poll: reading it again afterwards
    # raced with gradio, whose progress timer ("0.0s") can come back above a message a moment later.
    matched = page.wait_for_function(
        "([sel, pat]) => { const e = document.querySelector(sel);"
        " return e && new RegExp(pat).test(e.innerText) ? e.innerText : null; }",
        arg=[f"#{elem}", pattern], timeout=wait_ms(timeout_s), polling=250)
    return matched.json_value()


def set_textbox(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} textarea, #{elem} input").first
    # Up to 90 s, not playwright's 30: on 2 busy cores (a resumed training beside the test workers)
    # a freshly opened tab has taken over 30 s to render its boxes.
    box.fill(value, timeout=ACTION_TIMEOUT_MS)
    box.blur()  # gradio takes a textbox's value on blur


def upload(page, elem: str, path: Path) -> None:
    page.locator(f"#{elem} input[type=file]").set_input_files(str(path))


def paint_mask(page, elem: str, mask, step: int = 2) -> None:
    """Paint a bool mask (image pixels) as brush strokes along its rows' runs, every ``step`` rows."""
    import numpy as np

    bring_into_view(page, elem)
    page.locator(f"#{elem} button[aria-label='Brush']").click()
    size = (mask.shape[1], mask.shape[0])
    for y in range(0, mask.shape[0], step):
        row = np.flatnonzero(np.diff(np.concatenate([[0], mask[y].astype(np.int8), [0]])))
        for x0, x1 in zip(row[::2], row[1::2] - 1):
            page.mouse.move(*canvas_point(page, elem, size, x0 + 0.5, y + 0.5))
            page.mouse.down()
            page.mouse.move(*canvas_point(page, elem, size, x1 + 0.5, y + 0.5), steps=4)
            page.mouse.up()
