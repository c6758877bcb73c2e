"""Log lines that a hostile or broken client could repeat thousands of times a second, at most once per interval.

A producer sending 10,000 bad messages must not turn into 10,000 log lines (the log is an operator's, and a full disk
is an outage of its own): the first of each kind is logged at once, the rest are counted and reported with the next
line of that kind. Counting is exact — the metrics say how many; the log says what and that it goes on.
"""

from __future__ import annotations

import logging
import time

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """``warning(key, msg, *args)`` logs at most once per ``interval_s`` per ``key``; one thread only (no lock)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log now if ``key`` was quiet for ``interval_s``, else count it; True when it was logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += f" (and {skipped} more like it in the last {now - last:.0f} s)"  # type: ignore[operator]
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
