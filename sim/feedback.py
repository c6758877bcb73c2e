"""What the service did with the frames a producer sent: published, rejected (and why), dropped.

A PUSH socket only says a frame left; the service's answer comes back on its PUB socket as one ``error`` per
rejected or dropped frame and one ``scan_summary`` per ended scan (wire protocol v1). ``ServiceFeedback`` subscribes
to those two topics *before* the scan is sent (PUB/SUB delivers nothing to a late subscriber) and, afterwards,
collects them into one ``ScanOutcome`` per scan, so ``atomstream replay`` can say "rejected 256 of 256: non_finite"
instead of "sent 256 frames".
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["ScanOutcome", "ServiceFeedback"]

_EXAMPLES = 3  # details kept per reason: enough to see the cause, not a wall of text


@dataclass
class ScanOutcome:
    """One scan as the service accounted for it; ``summarised`` is False when no ``scan_summary`` arrived in time."""

    scan_id: str
    received: int = 0
    published: int = 0
    rejected: int = 0
    dropped: int = 0
    summarised: bool = False
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add_error(self, msg: Any) -> None:
        self.reasons[msg.reason] += 1
        where = f"frame {msg.frame_id}: " if msg.frame_id is not None else ""
        kept = self.examples.setdefault(msg.reason, [])
        if len(kept) < _EXAMPLES:
            kept.append(where + msg.detail)

    @property
    def ok(self) -> bool:
        return self.summarised and self.rejected == 0 and self.dropped == 0

    def lines(self) -> list[str]:
        """What to tell the user: one line of counts, then one per rejection reason with an example."""
        if not self.summarised:
            return [f"scan {self.scan_id}: no scan_summary from the service in time; errors seen: {self._reasons()}"]
        head = (
            f"scan {self.scan_id}: the service received {self.received}, published {self.published}, "
            f"rejected {self.rejected}, dropped {self.dropped}"
        )
        out = [head]
        for reason, n in self.reasons.most_common():
            out.append(f"  {reason} ×{n}: {self.examples[reason][0]}")
        return out

    def _reasons(self) -> str:
        return ", ".join(f"{r} ×{n}" for r, n in self.reasons.most_common()) or "none"


class ServiceFeedback:
    """A subscriber to the service's ``error`` and ``scan_summary`` topics; open it before sending the scan."""

    def __init__(self, endpoint: str, *, curve: Any = None, connect_timeout: float = 5.0) -> None:
        from streamer.wire.client import Subscriber

        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self._sub = Subscriber(endpoint, ("error", "scan_summary"), curve=curve, rcvtimeo_ms=200, track_seq=False)
        self.unattributed: collections.Counter[str] = collections.Counter()

    def start(self) -> ServiceFeedback:
        """Open and wait for the service's heartbeat; ``TimeoutError`` (socket closed) when none comes."""
        self._sub.start()
        try:
            self._sub.wait_connected(self.connect_timeout)
        except TimeoutError:
            self._sub.close()
            raise
        return self

    def collect(self, scan_ids: Sequence[str], *, timeout: float = 30.0) -> dict[str, ScanOutcome]:
        """Errors and summaries of ``scan_ids`` until every scan has its summary, or ``timeout`` s have passed.

        Errors that name no scan (a header that could not be read) are counted in ``unattributed``.
        """
        outcomes = {sid: ScanOutcome(sid) for sid in scan_ids}
        deadline = time.monotonic() + timeout
        while not all(o.summarised for o in outcomes.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                got = self._sub.recv(min(left, 0.5))
            except TimeoutError:
                continue
            msg = got.msg
            outcome = outcomes.get(getattr(msg, "scan_id", None) or "")
            if got.topic == "error" and outcome is not None:
                outcome.add_error(msg)
            elif got.topic == "error":
                self.unattributed[msg.reason] += 1
            elif got.topic == "scan_summary" and outcome is not None:
                outcome.received, outcome.published = msg.frames_received, msg.frames_published
                outcome.rejected, outcome.dropped = msg.frames_rejected, msg.frames_dropped
                outcome.summarised = True
        return outcomes

    def close(self) -> None:
        self._sub.close()

    def __enter__(self) -> ServiceFeedback:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
