"""Publishing: numbering messages per topic and sending them to the PUB socket and, optionally, the reliable XPUB.

PUB drops for a subscriber ``send_hwm`` behind, so a stuck viewer never stalls ingest. The optional reliable XPUB
(``XPUB_NODROP``) refuses instead: every published message also goes to it without blocking, and what it refuses
waits, in order, in a pending deque — while anything is pending the I/O thread stops reading ingest (the
back-pressure of ``overload=block``) until the deque is flushed. libzmq reports XPUB as always writable, so the
flush is retried on a short backing-off timer (``next_retry``) rather than on ``POLLOUT``. Its subscription frames
are read and discarded (XPUB hands them up; nobody else wants them).

The hold is bounded: a reliable subscriber that stops reading would otherwise freeze ingest for everyone, for ever.
Once messages have waited ``block_timeout_s``, ``give_up`` drops them (counted) and the reliable socket is lossy for
``10 × block_timeout_s`` — messages it refuses are dropped and counted, ingest runs — before it is tried as reliable
again. Its subscribers see the loss as ``seq`` gaps, as on the plain PUB.

Runs on the I/O thread only, like the sockets it sends on.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Any

import numpy as np
import zmq
from prometheus_client import Counter

from streamer.wire.protocol import encode_published

__all__ = ["Publisher"]

_RETRY_MIN_S, _RETRY_MAX_S = 0.0005, 0.01  # reliable-socket flush retries back off between these while refused
TOPICS = ("maps", "defects", "error", "status", "scan_summary")
_LOSSY_FACTOR = 10.0  # after giving up, the reliable socket stays lossy this many block timeouts


class Publisher:
    """``seq`` per topic, the lossy PUB and the reliable XPUB with its pending deque."""

    def __init__(
        self,
        pub: zmq.Socket[bytes],
        reliable: zmq.Socket[bytes] | None,
        *,
        block_timeout_s: float = 2.0,
        dropped: Counter | None = None,
    ) -> None:
        self.pub, self.reliable = pub, reliable
        self.seq = dict.fromkeys(TOPICS, 0)
        self.pending: deque[list[bytes | memoryview]] = deque()  # refused by the reliable socket, oldest first
        self.retry_s = _RETRY_MIN_S
        self.next_retry = 0.0
        self.block_timeout_s = block_timeout_s
        self.blocked_since: float | None = None  # when the oldest pending message was refused
        self.lossy_until = 0.0
        self.dropped = dropped

    @property
    def holding(self) -> bool:
        """Messages wait for the reliable socket (ingest should wait too)."""
        return bool(self.pending)

    def overdue(self, now: float) -> bool:
        """The oldest pending message has waited longer than ``block_timeout_s``."""
        return self.blocked_since is not None and now - self.blocked_since >= self.block_timeout_s

    def give_up(self, now: float) -> int:
        """Drop every pending message and turn the reliable socket lossy for a while; returns how many were dropped."""
        n = len(self.pending)
        self.pending.clear()
        self.blocked_since = None
        self.lossy_until = now + _LOSSY_FACTOR * self.block_timeout_s
        self._count_dropped(n)
        return n

    def _count_dropped(self, n: int) -> None:
        if self.dropped is not None and n:
            self.dropped.inc(n)

    def next_seq(self, topic: str) -> int:
        """The ``seq`` of the next message on ``topic``, counted as used."""
        seq = self.seq[topic]
        self.seq[topic] += 1
        return seq

    def publish(self, msg: Any, arrays: list[np.ndarray] | None = None) -> None:
        """``msg`` (its ``seq`` replaced by the topic's next) with its array buffers."""
        msg = msg.model_copy(update={"seq": self.next_seq(msg.kind)})
        self.send(encode_published(msg, *(arrays or [])))

    def send(self, parts: list[bytes | memoryview]) -> None:
        """To every PUB subscriber (lossy), and to the reliable socket in order (queued while it refuses)."""
        self.pub.send_multipart(parts, copy=False)
        if self.reliable is None:
            return
        if not self.pending:
            try:
                self.reliable.send_multipart(parts, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:  # a subscriber is send_hwm behind: ingest waits until it catches up
                now = time.monotonic()
                if now < self.lossy_until:  # it held ingest too long lately: drop instead
                    self._count_dropped(1)
                    return
                self.retry_s = _RETRY_MIN_S
                self.next_retry = now + self.retry_s
                self.blocked_since = now
        self.pending.append(parts)

    def flush_pending(self) -> None:
        """Send what the reliable socket refused, oldest first; back off while it still refuses."""
        if self.reliable is None:
            return
        progressed = False
        while self.pending:
            try:
                self.reliable.send_multipart(self.pending[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.retry_s = _RETRY_MIN_S if progressed else min(2 * self.retry_s, _RETRY_MAX_S)
                self.next_retry = time.monotonic() + self.retry_s
                if progressed:  # it reads, slowly: the hold is measured from its last progress
                    self.blocked_since = time.monotonic()
                return
            self.pending.popleft()
            progressed = True
        self.blocked_since = None

    def drain_subscriptions(self) -> None:
        """Read and discard the reliable XPUB's subscription frames."""
        if self.reliable is None:
            return
        with contextlib.suppress(zmq.Again):
            while True:
                self.reliable.recv(zmq.NOBLOCK)
