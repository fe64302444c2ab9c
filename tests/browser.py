"""A real browser for tests: Debian's headless Chromium, as a command.

``dump_dom(url)`` is the DOM after Chromium loaded and rendered the page; ``screenshot``
saves a PNG. Each run gets a new, temporary profile and no network beyond the page.
``scripts/install`` installs Chromium; without it these fail (never skip).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["dump_dom", "figures", "screenshot"]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _chromium(*args: str, timeout: float = 90.0) -> str:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: run scripts/install"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def dump_dom(url: str) -> str:
    return _chromium("--dump-dom", url)


def screenshot(url: str, path: Path, size: str = "1280,1500") -> None:
    _chromium(f"--screenshot={path}", f"--window-size={size}", "--hide-scrollbars", url)
    assert path.stat().st_size > 10_000, "the screenshot is (nearly) empty"


class _Figures(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open.append(dict(attrs).get("data-figure"))

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] is not None:
            name = self._open[-1]
            self.figures[name] = re.sub(r"\s+", " ", self.figures.get(name, "") + data).strip()


def figures(dom: str) -> dict[str, str]:
    """Every ``data-figure`` element's text, by figure name."""
    parser = _Figures()
    parser.feed(dom)
    return parser.figures
