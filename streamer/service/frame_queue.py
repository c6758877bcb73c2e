"""Frames between the two halves of the service: accepted by the I/O thread, not yet taken by the worker.

``QueuedFrame`` is a decoded, accepted frame; ``FrameResult`` what became of it (maps, or the error to publish);
``FrameQueue`` the bounded queue between the I/O thread (``put``) and the batching worker (``take``), with the
overload policy of the configuration. It is bounded in frames *and* bytes: counting frames alone let twelve 256 MB
frames from one producer sit ahead of a small producer's frames (seconds of latency, gigabytes of memory); with a
byte bound, the frames ahead of anyone's next frame are at most ``max_bytes`` (plus one frame) of work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from streamer.maps.pipeline import FrameMaps

__all__ = ["FrameQueue", "FrameResult", "QueuedFrame"]


@dataclass(frozen=True)
class QueuedFrame:
    """A decoded, accepted frame; ``array`` may be a read-only view on the received message."""

    scan_id: str
    frame_id: int
    array: np.ndarray
    t_acq_ns: int | None
    t_recv_ns: int
    t_recv: float  # perf_counter at receipt, for the end-to-end histogram
    pixel_size: float | None = None  # the frame's meta.pixel_size/pixel_unit, carried into its maps and defects
    pixel_unit: str | None = None


@dataclass(frozen=True)
class FrameResult:
    """What became of one frame: ``maps``, or ``reason``/``detail`` of the error to publish."""

    frame: QueuedFrame
    maps: FrameMaps | None = None
    reason: str | None = None
    detail: str = ""


class FrameQueue:
    """Frames accepted but not yet taken by the batcher (the model they are encoded with is the slot's business).

    ``block``: the I/O thread stops reading ingest while ``full()``, so ZeroMQ's high-water marks push back on the
    producer. ``drop_oldest``: ``put`` on a full queue evicts (and returns) the oldest frames.
    """

    def __init__(self, capacity: int, policy: Literal["block", "drop_oldest"], *, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity {capacity} must be at least 1 frame")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.policy = policy
        self._cond = threading.Condition()
        self._items: deque[QueuedFrame] = deque()
        self.nbytes = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        """No room for another frame: ``capacity`` frames, or ``max_bytes`` reached (an empty queue is never full,
        so a frame larger than ``max_bytes`` on its own still passes)."""
        return len(self._items) >= self.capacity or (self.max_bytes is not None and self.nbytes >= self.max_bytes)

    def put(self, item: QueuedFrame) -> list[QueuedFrame]:
        """Enqueue; returns the frames evicted to make room (``drop_oldest`` only)."""
        evicted: list[QueuedFrame] = []
        size = item.array.nbytes
        with self._cond:
            if self.policy == "drop_oldest":
                while self._items and (
                    len(self._items) >= self.capacity
                    or (self.max_bytes is not None and self.nbytes + size > self.max_bytes)
                ):
                    old = self._items.popleft()
                    self.nbytes -= old.array.nbytes
                    evicted.append(old)
            self._items.append(item)
            self.nbytes += size
            self._cond.notify_all()
        return evicted

    def close(self) -> None:
        """No more frames will come: the batcher finishes what is queued, then stops."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def drain(self) -> list[QueuedFrame]:
        """Remove and return everything still queued."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self.nbytes = 0
            self._cond.notify_all()
        return items

    def take(self, deadline: float | None) -> QueuedFrame | None:
        """The oldest frame, waiting until ``deadline`` (perf_counter; ``None``: until one comes or the queue is
        closed). ``None`` when the deadline passed, or the queue is closed and empty."""
        with self._cond:
            while not self._items:
                if self.closed:
                    return None
                timeout = None if deadline is None else deadline - time.perf_counter()
                if timeout is not None and timeout <= 0:
                    return None
                self._cond.wait(timeout)
            item = self._items.popleft()
            self.nbytes -= item.array.nbytes
            self._cond.notify_all()
            return item
