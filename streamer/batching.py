"""The service's compute half: a bounded frame queue and the worker that batches patches **across frames**.

No sockets here (they belong to the I/O thread of ``streamer.service``). The I/O thread puts decoded frames into a
``FrameQueue``; the ``Batcher`` thread takes them, prepares each with the current ``Pipeline`` (tile + FFT on the
device), and calls the encoder once it holds ``max_batch_patches`` patches or ``max_wait_ms`` have passed since
the batch's first frame — whichever comes first, so a trickle of small frames still shares encoder calls while a
lone frame waits at most ``max_wait_ms``. Every frame taken leaves as exactly one ``FrameResult`` (maps, or a reason
why not) through ``emit``; nothing is lost silently.

A reload swaps the pipeline between batches: the batch being collected keeps the pipeline it started with, so
frames in flight finish on the old model and the next batch uses the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from streamer.metrics import ServiceMetrics
from streamer.pipeline import FrameError, FrameMaps, Pipeline, PreparedFrame, slice_outputs

__all__ = ["Batcher", "FrameQueue", "FrameResult", "QueuedFrame"]

log = logging.getLogger("atomstream.service")


@dataclass(frozen=True)
class QueuedFrame:
    """A decoded, accepted frame; ``array`` may be a read-only view on the received message."""

    scan_id: str
    frame_id: int
    array: np.ndarray
    t_acq_ns: int | None
    t_recv_ns: int
    t_recv: float  # perf_counter at receipt, for the end-to-end histogram


@dataclass(frozen=True)
class FrameResult:
    """What became of one frame: ``maps``, or ``reason``/``detail`` of the error to publish."""

    frame: QueuedFrame
    maps: FrameMaps | None = None
    reason: str | None = None
    detail: str = ""


class FrameQueue:
    """Frames accepted but not yet taken by the batcher; its condition also guards the batcher's pipeline.

    ``block``: the I/O thread stops reading ingest while ``full()``, so ZeroMQ's high-water marks push back on the
    producer. ``drop_oldest``: ``put`` on a full queue evicts (and returns) the oldest frames.
    """

    def __init__(self, capacity: int, policy: Literal["block", "drop_oldest"]) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity {capacity} must be at least 1 frame")
        self.capacity = capacity
        self.policy = policy
        self.cond = threading.Condition()
        self._items: deque[QueuedFrame] = deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def put(self, item: QueuedFrame) -> list[QueuedFrame]:
        """Enqueue; returns the frames evicted to make room (``drop_oldest`` only)."""
        evicted: list[QueuedFrame] = []
        with self.cond:
            if self.policy == "drop_oldest":
                while len(self._items) >= self.capacity:
                    evicted.append(self._items.popleft())
            self._items.append(item)
            self.cond.notify_all()
        return evicted

    def close(self) -> None:
        """No more frames will come: the batcher finishes what is queued, then stops."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drain(self) -> list[QueuedFrame]:
        """Remove and return everything still queued."""
        with self.cond:
            items = list(self._items)
            self._items.clear()
            self.cond.notify_all()
        return items

    def take(self, deadline: float | None) -> QueuedFrame | None:
        """The oldest frame, waiting until ``deadline`` (perf_counter; ``None``: until one comes or the queue is
        closed). ``None`` when the deadline passed, or the queue is closed and empty."""
        with self.cond:
            while not self._items:
                if self.closed:
                    return None
                timeout = None if deadline is None else deadline - time.perf_counter()
                if timeout is not None and timeout <= 0:
                    return None
                self.cond.wait(timeout)
            item = self._items.popleft()
            self.cond.notify_all()
            return item


class Batcher:
    """The worker thread's loop: queue → prepare → cross-frame batch → encode → assemble → ``emit``."""

    def __init__(
        self,
        queue: FrameQueue,
        *,
        emit: Callable[[FrameResult], None],
        on_take: Callable[[], None],
        metrics: ServiceMetrics,
        max_batch_patches: int,
        max_wait_ms: float,
    ) -> None:
        self.queue = queue
        self.emit = emit
        self.on_take = on_take
        self.metrics = metrics
        self.max_batch_patches = max_batch_patches
        self.max_wait_s = max_wait_ms / 1000.0
        self._pipeline: Pipeline | None = None
        self.abort = False

    @property
    def pipeline(self) -> Pipeline | None:
        return self._pipeline

    def set_pipeline(self, pipeline: Pipeline) -> None:
        """Used from the next batch on (a batch being collected keeps its pipeline)."""
        with self.queue.cond:
            self._pipeline = pipeline
            self.queue.cond.notify_all()

    def stop_now(self) -> None:
        """Give up on queued frames (the drain timed out): the current batch finishes, nothing new starts."""
        with self.queue.cond:
            self.abort = True
            self.queue.cond.notify_all()

    def _wait_for_pipeline(self) -> Pipeline | None:
        with self.queue.cond:
            self.queue.cond.wait_for(lambda: self._pipeline is not None or self.queue.closed or self.abort)
            return None if self.abort else self._pipeline

    def run(self) -> None:
        while True:
            pipeline = self._wait_for_pipeline()
            if pipeline is None:
                for frame in self.queue.drain():
                    self.emit(FrameResult(frame, reason="internal", detail="the service stopped before a model loaded"))
                return
            first = self.queue.take(None)
            if first is None or self.abort:
                if first is not None:
                    self.emit(FrameResult(first, reason="internal", detail="the service stopped before encoding it"))
                return
            next_first: QueuedFrame | None = first
            while next_first is not None:  # a frame taken after a reload starts the new model's batch
                next_first = self._one_batch(self._pipeline or pipeline, next_first)

    def _one_batch(self, pipeline: Pipeline, first: QueuedFrame) -> QueuedFrame | None:
        """Collect and encode one batch on ``pipeline``; returns a frame taken after a reload, for the next batch.

        Frames the queue hands over after ``set_pipeline`` were accepted after the reload, so they must not join a
        batch of the old model.
        """
        batch: list[tuple[QueuedFrame, PreparedFrame]] = []
        n_patches = 0
        deadline = time.perf_counter() + self.max_wait_s
        item: QueuedFrame | None = first
        leftover: QueuedFrame | None = None
        while item is not None:
            self.on_take()
            prepared = self._prepare(pipeline, item)
            if prepared is not None:
                batch.append((item, prepared))
                n_patches += prepared.n
            if n_patches >= self.max_batch_patches or self.abort:
                break
            item = self.queue.take(deadline)
            if item is not None and self._pipeline is not pipeline:
                leftover = item
                break
        if batch:
            self._encode(pipeline, batch, n_patches)
        return leftover

    def _prepare(self, pipeline: Pipeline, item: QueuedFrame) -> PreparedFrame | None:
        try:
            prepared = pipeline.prepare(item.array)
        except FrameError as exc:
            self.emit(FrameResult(item, reason="shape_mismatch", detail=str(exc)))
            return None
        except Exception as exc:
            log.exception("preparing frame %s/%s failed", item.scan_id, item.frame_id)
            self.emit(FrameResult(item, reason="internal", detail=f"tiling failed: {type(exc).__name__}: {exc}"))
            return None
        self.metrics.stage_seconds.labels(stage="tile").observe(prepared.tile_s)
        self.metrics.stage_seconds.labels(stage="fft").observe(prepared.fft_s)
        return prepared

    def _observe_call(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.patches_encoded.inc(size)
        self.metrics.stage_seconds.labels(stage="encode").observe(seconds)

    def _encode(self, pipeline: Pipeline, batch: list[tuple[QueuedFrame, PreparedFrame]], n_patches: int) -> None:
        try:
            patches = batch[0][1].patches if len(batch) == 1 else torch.cat([p.patches for _, p in batch])
            outputs = pipeline.encode(patches, observe=self._observe_call)
        except Exception as exc:
            log.exception("encoding a batch of %d frames (%d patches) failed", len(batch), n_patches)
            detail = f"encoding a batch of {n_patches} patches failed: {type(exc).__name__}: {exc}"
            for item, _ in batch:
                self.emit(FrameResult(item, reason="internal", detail=detail))
            return
        start = 0
        for item, prepared in batch:
            t0 = time.perf_counter()
            try:
                maps = pipeline.assemble(prepared, slice_outputs(outputs, start, start + prepared.n))
            except Exception as exc:
                log.exception("assembling frame %s/%s failed", item.scan_id, item.frame_id)
                self.emit(FrameResult(item, reason="internal", detail=f"assembly failed: {type(exc).__name__}: {exc}"))
            else:
                self.metrics.stage_seconds.labels(stage="assemble").observe(time.perf_counter() - t0)
                self.emit(FrameResult(item, maps=maps))
            start += prepared.n
