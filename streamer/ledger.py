"""The service's accounting: every received frame ends as exactly one published, rejected or dropped frame.

``frames_received`` counts every ingest message except well-formed ``scan_start``/``scan_end``; each one ends as
exactly one ``maps`` (+ ``defects``) or one ``error``. *Rejected*: bad input (any ``ProtocolError`` reason, or a
frame too small for the model's patch: ``shape_mismatch``). *Dropped*: a good frame the service could not process
(``overloaded``, ``internal``). A scan's ``scan_summary`` is due once its ``scan_end`` arrived and every frame of that
scan received before it has been published, rejected or dropped.

Kept on the I/O thread only (it publishes every outcome), so none of this needs a lock; other threads read the
totals as a snapshot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from streamer.metrics import DROP_REASONS, ServiceMetrics
from streamer.protocol import ScanSummary

__all__ = ["Ledger", "ScanCounts"]

log = logging.getLogger("atomstream.service")

_MAX_OPEN_SCANS = 10_000


@dataclass
class ScanCounts:
    received: int = 0
    published: int = 0
    rejected: int = 0
    dropped: int = 0
    ended: bool = False
    n_frames: int | None = None

    @property
    def pending(self) -> int:
        return self.received - self.published - self.rejected - self.dropped


class Ledger:
    """Totals since start and per open scan, mirrored into the Prometheus counters."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.totals = {"received": 0, "published": 0, "rejected": 0, "dropped": 0}
        self.scans: dict[str, ScanCounts] = {}

    def scan(self, scan_id: str | None) -> ScanCounts | None:
        """The counts of ``scan_id`` (opened on first sight); ``None`` for messages that name no scan."""
        if scan_id is None:
            return None
        counts = self.scans.get(scan_id)
        if counts is None:
            if len(self.scans) >= _MAX_OPEN_SCANS:  # producers that never send scan_end must not grow memory
                stale = next(iter(self.scans))
                log.warning("forgetting scan %r (no scan_end among the last %d scans)", stale, _MAX_OPEN_SCANS)
                del self.scans[stale]
            counts = self.scans[scan_id] = ScanCounts()
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
        counts = self.scan(scan_id)
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
        return ScanSummary(
            scan_id=scan_id,
            n_frames=counts.n_frames,
            frames_received=counts.received,
            frames_published=counts.published,
            frames_rejected=counts.rejected,
            frames_dropped=counts.dropped,
        )
