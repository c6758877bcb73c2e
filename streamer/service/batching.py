"""The service's batching worker: it takes frames off the queue and batches their patches **across frames**.

No sockets here (they belong to the I/O thread, ``streamer.service.io_loop``). The I/O thread puts decoded frames into a
``FrameQueue`` (``streamer.service.frame_queue``); the ``Batcher`` thread takes them, prepares each with the current
``Pipeline`` (frame normalisation, patch grid), and hands a batch to the encoder once it holds
``max_batch_patches`` patches or ``max_wait_ms`` have passed since the batch's first frame — whichever comes first,
so a trickle of small frames still shares encoder calls while a lone frame waits at most ``max_wait_ms``. Handing
over means writing the batch's patches into the encoder's batch buffers, chunk by chunk, for the encoder's own
thread (``streamer.service.encode_stage``), which encodes, assembles and emits while this thread writes the next chunk
or prepares the next batch. A new batch starts only once the encoder is idle, so the frames out of the queue are those
of one batch, as ``queue_size`` and the overload policy promise. Every frame taken leaves as exactly one ``FrameResult``
(maps, or a reason why not) through ``emit``, in the order taken; nothing is lost silently.

The pipeline comes from the model slot (``streamer.service.model_slot``), read at the start of each batch: a reload
swaps it there between batches, the batch being collected keeps the pipeline it started with, so frames in flight
finish on the old model and the next batch uses the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from streamer.maps.pipeline import FrameError, Pipeline, PreparedFrame
from streamer.service.encode_stage import EncodeStage
from streamer.service.frame_queue import FrameQueue, FrameResult, QueuedFrame
from streamer.service.metrics import ServiceMetrics
from streamer.service.model_slot import ModelSlot

__all__ = ["Batcher"]

log = logging.getLogger("atomstream.service")


class Batcher:
    """The worker thread's loop: queue → prepare → cross-frame batch → write patches → (encoder thread) encode →
    assemble → ``emit``."""

    def __init__(
        self,
        queue: FrameQueue,
        slot: ModelSlot,
        *,
        emit: Callable[[FrameResult], None],
        on_take: Callable[[], None],
        metrics: ServiceMetrics,
        max_batch_patches: int,
        max_wait_ms: float,
    ) -> None:
        self.queue = queue
        self.slot = slot
        self.emit = emit
        self.on_take = on_take
        self.metrics = metrics
        self.max_batch_patches = max_batch_patches
        self.max_wait_s = max_wait_ms / 1000.0
        self._stage = EncodeStage(emit=emit, metrics=metrics)
        self._abort = threading.Event()

    def stop_now(self) -> None:
        """Give up on queued frames (the drain timed out): the current batch finishes, nothing new starts.

        Called once the queue and the slot are closed, so nothing this thread waits on can block it for long.
        """
        self._abort.set()

    def run(self) -> None:
        """Until the queue is closed and empty (or ``stop_now``); returns once every frame taken has left."""
        self._stage.start()
        try:
            self._loop()
        finally:
            self._stage.close()

    def _loop(self) -> None:
        while True:
            pipeline = self.slot.wait()  # returns without one once the service stops
            if self._abort.is_set():
                return  # the I/O thread answers what is left in the queue
            if pipeline is None:
                for frame in self.queue.drain():
                    self._stage.pass_through(
                        FrameResult(frame, reason="internal", detail="the service stopped before a model loaded")
                    )
                return
            self._stage.wait_idle()
            first = self.queue.take(None)
            if first is None or self._abort.is_set():
                if first is not None:
                    self._stage.pass_through(
                        FrameResult(first, reason="internal", detail="the service stopped before encoding it")
                    )
                return
            next_first: QueuedFrame | None = first
            while next_first is not None:  # a frame taken after a reload starts the new model's batch
                next_first = self._one_batch(self.slot.pipeline or pipeline, next_first)

    def _one_batch(self, pipeline: Pipeline, first: QueuedFrame) -> QueuedFrame | None:
        """Collect one batch on ``pipeline`` and hand it to the encoder thread; returns a frame taken after a
        reload, for the next batch.

        Frames the queue hands over after a new pipeline was installed in the slot were accepted after the reload, so
        they must not join a batch of the old model.
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
            if n_patches >= self.max_batch_patches or self._abort.is_set():
                break
            item = self.queue.take(deadline)
            if item is not None and self.slot.pipeline is not pipeline:
                leftover = item
                break
        if batch:
            self._stage.submit(pipeline, batch)
        return leftover

    def _prepare(self, pipeline: Pipeline, item: QueuedFrame) -> PreparedFrame | None:
        try:
            prepared = pipeline.prepare(item.array)
        except FrameError as exc:
            self._stage.pass_through(FrameResult(item, reason="shape_mismatch", detail=str(exc)))
            return None
        except Exception as exc:
            log.exception("preparing frame %s/%s failed", item.scan_id, item.frame_id)
            detail = f"tiling failed: {type(exc).__name__}: {exc}"
            self._stage.pass_through(FrameResult(item, reason="internal", detail=detail))
            return None
        self.metrics.stage_seconds.labels(stage="tile").observe(prepared.tile_s)
        return prepared
