"""A report as a browser draws it: headless Chromium (the system's, e.g. Debian's `chromium`; no browser download)
driven by the `playwright` package, for the README's example picture and the test that checks the pictures render.

    from condensation.report.browser import screenshot
    screenshot("runs/report/passkey-cpu.html", "docs/img/report_example.png")
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# no network, no first-run or sync machinery, and a throw-away profile (playwright makes a fresh user-data-dir)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def find_chromium(path: str | None = None) -> str | None:
    """The given executable, else `chromium` on the PATH, else /usr/bin/chromium; None when there is none."""
    for candidate in (path, shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


@contextlib.contextmanager
def open_page(html: str | Path, chromium: str | None = None, width: int = 1100, height: int = 900) -> Iterator:
    """A playwright page with the file loaded (every image decoded or failed), in a browser closed afterwards."""
    from playwright.sync_api import sync_playwright

    exe = find_chromium(chromium)
    if exe is None:
        raise FileNotFoundError("no chromium executable (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            yield page
        finally:
            browser.close()


def screenshot(html: str | Path, png: str | Path, chromium: str | None = None, width: int = 1100,
               colors: int | None = 256) -> Path:
    """The whole page as one PNG; colors=256 stores it with a palette (a third of the size; charts and heat maps
    keep their colours), None keeps full colour."""
    from PIL import Image

    with open_page(html, chromium, width) as page:
        data = page.screenshot(full_page=True)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(data)
    if colors:
        img = Image.open(png).convert("RGB")
        img.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(png, optimize=True)
    return png
