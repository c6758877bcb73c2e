"""Debian's Chromium, headless, for tests of the web pages: dump the DOM after scripts ran, or take a screenshot.

Each call is a fresh browser with its own profile directory and every background fetch off (no network beyond the
page). ``--virtual-time-budget`` lets the page's scripts and fetches finish before the DOM or the picture is taken.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CHROMIUM", "dump_dom", "screenshot"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _run(url: str, extra: list[str], budget_ms: int, timeout_s: float) -> str:
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="atomstream-chromium-") as profile:
        args = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(url: str, *, budget_ms: int = 5000, timeout_s: float = 90.0) -> str:
    """The page's DOM as HTML once its scripts have run for ``budget_ms`` of virtual time."""
    return _run(url, ["--dump-dom"], budget_ms, timeout_s)


def screenshot(url: str, path: Path, *, size: tuple[int, int] = (1240, 1000), budget_ms: int = 5000) -> Path:
    """A PNG of the page at ``size`` (width, height) pixels."""
    _run(url, [f"--screenshot={path}", f"--window-size={size[0]},{size[1]}"], budget_ms, 90.0)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {path}")
    return path
