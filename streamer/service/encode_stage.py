"""The encoder's own thread, fed by the batching worker through two batch buffers (double buffering).

Why a second thread: on the CPU the encoder keeps every core busy while it runs, and the rest of the per-frame work
— cutting patches into the batch buffer, assembling maps and defects — would otherwise run in series with it, all
cores but one idle meanwhile. Here the worker (``streamer.service.batching``) writes the next chunk of a batch's patches
into one buffer while the encoder reads the other, and the encoder thread assembles a batch's maps once its last chunk
is encoded, while the worker already prepares the next batch; the operating system shares the cores between the two. The
worker starts a new batch only when the encoder is idle (``wait_idle``), so no more frames are out of the queue than
before (``queue_size`` still bounds the frames waiting).

The buffers and what fills them are ``streamer.service.batch_buffers``; everything else is the reference
``Pipeline``'s own methods — ``call_encoder`` on each chunk, ``join`` and ``split`` of a batch's outputs, ``assemble``
per frame — so what the service publishes is what ``Pipeline.process`` computes.

Order is kept: chunks are encoded and batches assembled in the order the worker submitted them, and the worker's own
results (a frame it could not prepare) pass through the same queue, so frames leave in the order they were taken.
Every frame submitted leaves as exactly one ``FrameResult``. ``close`` waits for everything submitted to leave, then
re-raises a failure of the thread itself (a failed encoder call is not one: its frames get ``internal`` errors).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streamer.maps.arrays import Array
from streamer.maps.pipeline import Pipeline, PreparedFrame
from streamer.service.batch_buffers import PatchWriter, batch_buffer, fits
from streamer.service.frame_queue import FrameResult, QueuedFrame
from streamer.service.metrics import ServiceMetrics

__all__ = ["N_BUFFERS", "EncodeStage"]

log = logging.getLogger("atomstream.service")

#: Batch buffers: one being written by the worker while the encoder reads the other.
N_BUFFERS = 2


@dataclass
class _Batch:
    pipeline: Pipeline
    frames: list[tuple[QueuedFrame, PreparedFrame]]
    calls: list[dict[str, np.ndarray]] = field(default_factory=list)  # the encoder thread's: each call's outputs
    error: str | None = None  # set by whichever thread failed first; its frames then leave as ``internal`` errors

    @property
    def n_patches(self) -> int:
        return sum(prepared.n for _, prepared in self.frames)


@dataclass(frozen=True)
class _Job:
    """One encoder call on ``buffer`` rows ``:size`` (the batch's next patches); the end of a batch (no buffer);
    or a result the worker produced itself, passed through to keep the order."""

    batch: _Batch | None = None
    buffer: Array | None = None
    slot: int | None = None
    size: int = 0
    result: FrameResult | None = None
    band: tuple[PreparedFrame, tuple[int, int]] | None = None  # grid rows of a frame encoded whole, not a buffer


class EncodeStage:
    """The encoder thread and its batch buffers. ``submit`` runs on the worker thread, everything else here on the
    encoder thread; ``close`` ends it."""

    def __init__(self, *, emit: Callable[[FrameResult], None], metrics: ServiceMetrics) -> None:
        self.emit = emit
        self.metrics = metrics
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._free: list[int] = list(range(N_BUFFERS))
        self._bands = 0  # bands of frames encoded whole, queued or inside the encoder
        self._buffers: list[Array] = []
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="atomstream-encode", daemon=True)

    def start(self) -> EncodeStage:
        self._thread.start()
        return self

    def close(self) -> None:
        """Wait until every submitted job has left, end the thread; re-raise its failure."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join()
        if self._failure is not None:
            raise self._failure

    # ---------------------------------------------------------------- worker side
    def wait_idle(self) -> None:
        """Wait until no chunk is waiting for or inside the encoder (batches may still be assembling).

        The worker takes the next batch's first frame only then, so frames out of the ``FrameQueue`` are only those
        of the batch being encoded — what ``queue_size`` and the overload policy promise — and the overlap is
        within a batch (writing chunk k+1 while chunk k is encoded) and between a batch's assembly and the next
        batch's preparation.
        """
        with self._cond:
            self._cond.wait_for(lambda: (len(self._free) == N_BUFFERS and not self._bands) or self._failure is not None)
            self._raise_failure()

    def pass_through(self, result: FrameResult) -> None:
        """Emit ``result`` after everything submitted before it."""
        self._put(_Job(result=result))

    def submit(self, pipeline: Pipeline, frames: list[tuple[QueuedFrame, PreparedFrame]]) -> None:
        """Queue the batch for the encoder in order: the patches of consecutive frames written into the batch buffers
        chunk by chunk (each chunk queued as soon as it is written), a frame the pipeline encodes whole
        (``Pipeline.encodes_whole``) as bands of its grid rows, with nothing written; returns once the last job is
        queued (the encoder may still be busy with them)."""
        batch = _Batch(pipeline, frames)
        run: list[PreparedFrame] = []
        for _, prepared in frames:
            if not pipeline.encodes_whole(prepared):
                run.append(prepared)
                continue
            self._write(batch, run)
            run = []
            for rows in pipeline.bands(prepared):
                with self._cond:
                    self._bands += 1
                self._put(_Job(batch=batch, band=(prepared, rows), size=(rows[1] - rows[0]) * prepared.n_columns))
        self._write(batch, run)
        self._put(_Job(batch=batch))  # the end: assemble and emit once the chunks before it are encoded

    def _write(self, batch: _Batch, frames: list[PreparedFrame]) -> None:
        """The patches of ``frames`` into the batch buffers, a chunk at a time, each queued once written."""
        if not frames or batch.error is not None:
            return
        pipeline = batch.pipeline
        self._buffers_for(pipeline)
        writer = PatchWriter(frames)
        while writer.written < writer.total:
            size = min(pipeline.max_batch_patches, writer.total - writer.written)
            slot, buffer = self._take_buffer()
            try:
                writer.write(buffer[:size])
            except Exception as exc:
                log.exception("writing a batch of %d frames (%d patches) failed", len(frames), writer.total)
                batch.error = f"preparing a batch of {batch.n_patches} patches failed: {type(exc).__name__}: {exc}"
                self._release(slot)
                break
            self._put(_Job(batch=batch, buffer=buffer, slot=slot, size=size))
        for seconds in writer.seconds:
            self.metrics.stage_seconds.labels(stage="fft").observe(seconds)

    def _put(self, job: _Job) -> None:
        with self._cond:
            self._raise_failure()
            self._jobs.append(job)
            self._cond.notify_all()

    def _take_buffer(self) -> tuple[int, Array]:
        with self._cond:
            self._cond.wait_for(lambda: self._free or self._failure is not None)
            self._raise_failure()
            slot = self._free.pop(0)
            return slot, self._buffers[slot]

    def _buffers_for(self, pipeline: Pipeline) -> None:
        """Buffers shaped for ``pipeline`` (after a reload to another patch size or device: new ones, once the
        encoder has finished with the old)."""
        with self._cond:
            if self._buffers and fits(self._buffers[0], pipeline):
                return
            self._cond.wait_for(lambda: len(self._free) == N_BUFFERS or self._failure is not None)
            self._raise_failure()
            self._buffers = []  # let the old ones go before allocating (device memory)
            self._buffers = [batch_buffer(pipeline) for _ in range(N_BUFFERS)]

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError("the encoder thread failed") from self._failure

    def _release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    # ---------------------------------------------------------------- encoder thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._jobs or self._closed)
                    if not self._jobs:
                        return
                    job = self._jobs.popleft()
                self._do(job)
        except BaseException as exc:
            log.exception("the encoder thread failed")
            with self._cond:
                self._failure = exc
                self._cond.notify_all()

    def _do(self, job: _Job) -> None:
        if job.result is not None:
            self.emit(job.result)
            return
        batch = job.batch
        assert batch is not None
        if job.band is not None:
            if batch.error is None:
                prepared, rows = job.band
                try:
                    batch.calls.append(batch.pipeline.call_frame(prepared, rows, observe=self._observe_call))
                except Exception as exc:
                    log.exception("encoding grid rows %s of a frame failed", rows)
                    batch.error = f"encoding a frame's grid rows {rows} failed: {type(exc).__name__}: {exc}"
            with self._cond:
                self._bands -= 1
                self._cond.notify_all()
            return
        if job.buffer is None:
            self._finish(batch)
            return
        if batch.error is None:
            try:
                batch.calls.append(batch.pipeline.call_encoder(job.buffer[: job.size], observe=self._observe_call))
            except Exception as exc:
                log.exception("encoding a chunk of %d patches failed", job.size)
                batch.error = f"encoding a batch of {batch.n_patches} patches failed: {type(exc).__name__}: {exc}"
        if job.slot is not None:
            self._release(job.slot)

    def _observe_call(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.patches_encoded.inc(size)
        self.metrics.stage_seconds.labels(stage="encode").observe(seconds)

    def _finish(self, batch: _Batch) -> None:
        """Assemble and emit each frame of a fully encoded batch (or its error)."""
        if batch.error is not None:
            for item, _ in batch.frames:
                self.emit(FrameResult(item, reason="internal", detail=batch.error))
            return
        pipeline = batch.pipeline
        try:
            per_frame = pipeline.split(pipeline.join(batch.calls), [prepared for _, prepared in batch.frames])
        except Exception as exc:
            log.exception("joining the outputs of a batch of %d frames failed", len(batch.frames))
            for item, _ in batch.frames:
                self.emit(FrameResult(item, reason="internal", detail=f"assembly failed: {type(exc).__name__}: {exc}"))
            return
        for (item, prepared), outputs in zip(batch.frames, per_frame, strict=True):
            t0 = time.perf_counter()
            try:
                maps = pipeline.assemble(prepared, outputs)
            except Exception as exc:
                log.exception("assembling frame %s/%s failed", item.scan_id, item.frame_id)
                self.emit(FrameResult(item, reason="internal", detail=f"assembly failed: {type(exc).__name__}: {exc}"))
            else:
                self.metrics.stage_seconds.labels(stage="assemble").observe(time.perf_counter() - t0)
                self.emit(FrameResult(item, maps=maps))
