"""Ctrl-C for commands that must not stop mid-message: the first SIGINT sets an event the library checks between
messages, the second raises ``KeyboardInterrupt`` at once. Signal handlers are process-wide, so they live here, in
the CLI, and never in library code."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["first_sigint_sets"]


@contextmanager
def first_sigint_sets(event: threading.Event) -> Iterator[threading.Event]:
    """Inside: SIGINT sets ``event`` (once), then raises; the previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield event  # only the main thread may install handlers; elsewhere Ctrl-C keeps its default
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
