"""The service's accounting: every received frame ends as exactly one published, rejected or dropped frame.

``frames_received`` counts every ingest message except well-formed, admitted ``scan_start``/``scan_end``; each one ends
as exactly one ``maps`` (+ ``defects``) or one ``error``. *Rejected*: bad input (any ``ProtocolError`` reason, or a
frame too small for the model's patch: ``shape_mismatch``). *Dropped*: a good frame the service could not process
(``overloaded``, ``internal``). A scan's ``scan_summary`` is due once its ``scan_end`` arrived and every frame of that
scan received before it has been published, rejected or dropped.

Bounded: at most ``max_open_scans`` scans are counted at once and a scan id has at most ``max_scan_id_chars``.
``admit`` refuses a message that would open a scan beyond that (``overloaded``) or names one with a longer id
(``bad_header``) — the caller publishes the refusal as an ``error`` and counts it like any other. A live scan is
never forgotten to make room (that made a summary report 50 of 100 frames); only a scan idle for ``idle_s`` with
nothing in flight is. The last summary stays in ``last_summary`` until the next scan opens, so the status heartbeat
can repeat it to a subscriber that lost the message itself.

Kept on the I/O thread only (it publishes every outcome), so none of this needs a lock; other threads read the
totals as a snapshot.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from streamer.service.metrics import DROP_REASONS, ServiceMetrics
from streamer.wire.protocol import ProtocolError, ScanSummary

__all__ = ["Ledger", "ScanCounts"]


@dataclass
class ScanCounts:
    received: int = 0
    published: int = 0
    rejected: int = 0
    dropped: int = 0
    ended: bool = False
    n_frames: int | None = None
    seen: float = field(default_factory=time.monotonic)

    @property
    def pending(self) -> int:
        return self.received - self.published - self.rejected - self.dropped


class Ledger:
    """Totals since start and per open scan (at most ``max_open_scans``), mirrored into the Prometheus counters."""

    def __init__(
        self, metrics: ServiceMetrics, *, max_open_scans: int = 1024, max_id_chars: int = 256, idle_s: float = 600.0
    ) -> None:
        self.metrics = metrics
        self.max_open_scans, self.max_id_chars, self.idle_s = max_open_scans, max_id_chars, idle_s
        self.totals = {"received": 0, "published": 0, "rejected": 0, "dropped": 0}
        self.scans: OrderedDict[str, ScanCounts] = OrderedDict()  # least recently seen first
        self.last_summary: ScanSummary | None = None

    def admit(self, scan_id: str) -> None:
        """Raise ``ProtocolError`` if a message naming ``scan_id`` cannot be counted (id too long, too many scans)."""
        if len(scan_id) > self.max_id_chars:
            raise ProtocolError(
                "bad_header",
                f"scan_id has {len(scan_id)} characters; the limit is {self.max_id_chars} (max_scan_id_chars)",
                scan_id=scan_id[:64],
            )
        if scan_id in self.scans or len(self.scans) < self.max_open_scans:
            return
        stale_id, stale = next(iter(self.scans.items()))
        if stale.pending == 0 and time.monotonic() - stale.seen >= self.idle_s:
            del self.scans[stale_id]  # idle long enough and nothing in flight: nobody waits for its summary
            return
        raise ProtocolError(
            "overloaded",
            f"{len(self.scans)} scans are open (max_open_scans); send scan_end for finished scans, or wait for idle "
            f"ones to expire ({self.idle_s:.0f} s)",
            scan_id=scan_id,
        )

    def scan(self, scan_id: str | None) -> ScanCounts | None:
        """The counts of ``scan_id`` (opened on first sight if ``admit`` allows); ``None`` for messages that name no
        scan or one the ledger cannot take (their totals still count)."""
        if scan_id is None:
            return None
        counts = self.scans.get(scan_id)
        if counts is None:
            try:
                self.admit(scan_id)
            except ProtocolError:
                return None
            counts = self.scans[scan_id] = ScanCounts()
            self.last_summary = None  # the next scan has started
        else:
            counts.seen = time.monotonic()
            self.scans.move_to_end(scan_id)
        return counts

    def received(self, scan_id: str | None) -> None:
        self.metrics.frames_received.inc()
        self.totals["received"] += 1
        counts = self.scan(scan_id)
        if counts is not None:
            counts.received += 1

    def published(self, scan_id: str) -> None:
        self.metrics.frames_published.inc()
        self.totals["published"] += 1
        counts = self.scans.get(scan_id)
        if counts is not None:
            counts.published += 1

    def failed(self, scan_id: str | None, reason: str) -> None:
        """A received frame ended as an ``error``: dropped (``DROP_REASONS``) or rejected."""
        kind = "dropped" if reason in DROP_REASONS else "rejected"
        counter = self.metrics.frames_dropped if kind == "dropped" else self.metrics.frames_rejected
        counter.labels(reason=reason).inc()
        self.totals[kind] += 1
        counts = self.scans.get(scan_id) if scan_id is not None else None
        if counts is not None:
            setattr(counts, kind, getattr(counts, kind) + 1)

    def ended(self, scan_id: str, n_frames: int | None) -> None:
        counts = self.scan(scan_id)
        if counts is not None:
            counts.ended, counts.n_frames = True, n_frames

    def summary_due(self, scan_id: str | None) -> ScanSummary | None:
        """The scan's ``scan_summary`` if it is complete (and forget the scan), else ``None``."""
        counts = self.scans.get(scan_id) if scan_id is not None else None
        if scan_id is None or counts is None or not counts.ended or counts.pending > 0:
            return None
        del self.scans[scan_id]
        self.last_summary = ScanSummary(
            scan_id=scan_id,
            n_frames=counts.n_frames,
            frames_received=counts.received,
            frames_published=counts.published,
            frames_rejected=counts.rejected,
            frames_dropped=counts.dropped,
        )
        return self.last_summary
