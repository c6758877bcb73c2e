"""The I/O thread: the one owner of every socket (ZeroMQ sockets are not thread-safe).

One ``Poller`` waits on the ingest PULL, the control REP, the reliable XPUB's subscription frames and the read end of
a local socket pair, the *wake-up pipe*, which other threads write a byte to when they hand the I/O thread something:
the worker took a frame (room in the queue again), a result is in the outbox, a reload finished, stop was requested.
Each turn of the loop, in order: clear the wake-ups, flush what the reliable socket refused earlier, publish the
results in the outbox, answer a control request, read a burst of ingest, finish a reload, send the status heartbeat.

Ingest is decoded and validated here (``protocol.decode``); accepted frames go to the ``FrameQueue``. Reading stops
while the queue is full under ``overload=block`` or a reliable subscriber is behind, so ZeroMQ's high-water marks
push back on the producer. Publishing (``streamer.publisher``) and the accounting (``streamer.ledger``) happen here
too, so ``seq`` numbering and per-scan counts need no locks.

Shutdown (``stop``): stop reading ingest after taking what already arrived in the socket's queue, finish and publish
every accepted frame (bounded by ``drain_timeout_s``; frames left then get an ``internal`` error), flush scan
summaries and the reliable socket's pending messages (bounded by ``linger_ms``); the caller then closes the sockets.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from streamer.batching import Batcher
from streamer.config import ServiceConfig
from streamer.frame_queue import FrameQueue, FrameResult, QueuedFrame
from streamer.ledger import Ledger
from streamer.metrics import ServiceMetrics
from streamer.model_loader import ModelLoader, ReloadJob
from streamer.pipeline import Pipeline, PipelineError
from streamer.protocol import (
    ControlReply,
    Error,
    Frame,
    ProtocolError,
    ReloadCommand,
    ScanEnd,
    ScanStart,
    SetCommand,
    Status,
    decode,
    decode_control,
    encode_control,
    encode_published,
)
from streamer.publisher import Publisher
from streamer.sockets import SocketSet

__all__ = ["IOLoop", "WakePipe"]

log = logging.getLogger("atomstream.service")

_INGEST_BURST = 64  # ingest messages read per poller wake-up before the outbox and control get a turn


class WakePipe:
    """A local socket pair: any thread ``wake``s, the I/O thread polls the read end and ``clear``s it."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        """The read end, for the poller (which reports it by this number)."""
        return self._r.fileno()

    def wake(self) -> None:
        # a full pipe means the poller wakes anyway; a closed one means we are shutting down
        with contextlib.suppress(BlockingIOError, OSError):
            self._w.send(b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class IOLoop:
    """The I/O thread's state and loop; ``run`` returns once a requested stop has drained."""

    def __init__(
        self,
        cfg: ServiceConfig,
        sockets: SocketSet,
        *,
        metrics: ServiceMetrics,
        ledger: Ledger,
        frames: FrameQueue,
        outbox: queue.SimpleQueue[FrameResult],
        batcher: Batcher,
        models: ModelLoader,
        wake: WakePipe,
        stop_requested: threading.Event,
        worker_alive: Callable[[], bool],
        status: Callable[[], Status],
    ) -> None:
        self.cfg = cfg
        self.pull, self.rep, self.reliable = sockets.pull, sockets.rep, sockets.reliable
        self.publisher = Publisher(sockets.pub, sockets.reliable)
        self.metrics, self.ledger, self.frames, self.outbox = metrics, ledger, frames, outbox
        self.batcher, self.models = batcher, models
        self.wake, self.wake_fd = wake, wake.fileno()
        self.stop_requested, self.worker_alive, self.status = stop_requested, worker_alive, status
        self.poller = zmq.Poller()
        self.poller.register(self.rep, zmq.POLLIN)
        self.poller.register(self.wake_fd, zmq.POLLIN)
        if self.reliable is not None:
            self.poller.register(self.reliable, zmq.POLLIN)  # subscription frames, read and discarded
        self.reading = False
        self.ingest_open = True
        self.reload: ReloadJob | None = None
        self.drain_deadline: float | None = None
        self.flush_deadline: float | None = None

    # ---------------------------------------------------------------- loop
    def run(self) -> None:
        pending = self.publisher.pending
        next_status = time.monotonic()
        while True:
            self._set_reading(self.ingest_open and not self._held_back())
            now = time.monotonic()
            timeout = max(0.0, next_status - now)
            if self.drain_deadline is not None and self.flush_deadline is None:
                timeout = min(timeout, max(0.0, self.drain_deadline - now))
            if pending:
                timeout = min(timeout, max(0.0, self.publisher.next_retry - now))
            events = dict(self.poller.poll(timeout * 1000.0))
            if self.wake_fd in events:
                self.wake.clear()
            if self.reliable is not None and self.reliable in events:
                self.publisher.drain_subscriptions()
            if pending and time.monotonic() >= self.publisher.next_retry:
                self.publisher.flush_pending()
            self._flush_outbox()
            if self.rep in events:
                self._control()
            if self.pull in events:
                self._read_ingest(_INGEST_BURST)
            if self.reload is not None and self.reload.done.is_set():
                self._finish_reload()
            now = time.monotonic()
            if now >= next_status:
                self.publisher.publish(self.status())
                next_status = max(next_status + self.cfg.status_interval_s, now)
            if self.stop_requested.is_set() and self._shutdown_step():
                return

    def _shutdown_step(self) -> bool:
        """One step of the drain; True when everything accepted has been published."""
        if self.ingest_open:
            self._read_ingest(4 * self.cfg.recv_hwm + self.cfg.queue_size, ignore_full=True)
            self.ingest_open = False
            self._set_reading(False)
            self.frames.close()
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
        worker_done = not self.worker_alive()
        if not worker_done and time.monotonic() < (self.drain_deadline or 0.0):
            return False
        if self.flush_deadline is None:
            if not worker_done:
                self.batcher.stop_now()
            self._flush_outbox()
            for frame in self.frames.drain():  # only left when the worker died or the drain timed out
                self._on_result(FrameResult(frame, reason="internal", detail="the service stopped before encoding it"))
            if self.reload is not None:
                self.reload.done.wait(self.cfg.drain_timeout_s)
                self._finish_reload()
            self.flush_deadline = time.monotonic() + self.cfg.linger_ms / 1000.0
        pending = self.publisher.pending
        if pending and time.monotonic() < self.flush_deadline:
            return False  # a reliable subscriber is still behind: the loop keeps retrying until linger_ms
        if pending:
            log.warning("a reliable subscriber was behind at shutdown: %d messages not sent", len(pending))
        return True

    def _held_back(self) -> bool:
        """Ingest waits: the queue is full under ``block``, or a reliable subscriber has not taken everything yet."""
        return bool(self.publisher.pending) or (self.cfg.overload == "block" and self.frames.full())

    def _set_reading(self, on: bool) -> None:
        if on != self.reading:
            if on:
                self.poller.register(self.pull, zmq.POLLIN)
            else:
                self.poller.unregister(self.pull)
            self.reading = on

    # ---------------------------------------------------------------- results and errors
    def _flush_outbox(self) -> None:
        while True:
            try:
                result = self.outbox.get_nowait()
            except queue.Empty:
                return
            self._on_result(result)

    def _on_result(self, result: FrameResult) -> None:
        frame = result.frame
        if result.maps is None:
            self._error(frame.scan_id, frame.frame_id, result.reason or "internal", result.detail)
            return
        t0 = time.perf_counter()
        maps = result.maps
        header = maps.maps_message(
            scan_id=frame.scan_id,
            frame_id=frame.frame_id,
            seq=self.publisher.next_seq("maps"),
            t_acq_ns=frame.t_acq_ns,
            t_recv_ns=frame.t_recv_ns,
            t_pub_ns=time.time_ns(),
            pixel_size=frame.pixel_size,
            pixel_unit=frame.pixel_unit,
        )
        self.publisher.send(encode_published(header, *maps.buffers()))
        defects = maps.defects_message(
            scan_id=frame.scan_id,
            frame_id=frame.frame_id,
            seq=0,
            pixel_size=frame.pixel_size,
            pixel_unit=frame.pixel_unit,
        )
        self.publisher.publish(defects)
        done = time.perf_counter()
        self.metrics.stage_seconds.labels(stage="publish").observe(done - t0)
        self.metrics.end_to_end_seconds.observe(done - frame.t_recv)
        self.ledger.published(frame.scan_id)
        self._maybe_summary(frame.scan_id)

    def _error(self, scan_id: str | None, frame_id: int | None, reason: str, detail: str) -> None:
        """Publish an ``error`` for a received frame and count it as rejected or dropped."""
        self.publisher.publish(Error(scan_id=scan_id, frame_id=frame_id, reason=reason, detail=detail))  # type: ignore[arg-type]
        self.ledger.failed(scan_id, reason)
        self._maybe_summary(scan_id)

    def _maybe_summary(self, scan_id: str | None) -> None:
        summary = self.ledger.summary_due(scan_id)
        if summary is not None:
            self.publisher.publish(summary)

    # ---------------------------------------------------------------- ingest
    def _read_ingest(self, budget: int, *, ignore_full: bool = False) -> None:
        for _ in range(budget):
            if not ignore_full and self._held_back():
                return
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_ingest(parts)

    def _on_ingest(self, parts: list[zmq.Frame]) -> None:
        t_recv_ns, t_recv = time.time_ns(), time.perf_counter()
        try:
            msg, arrays = decode(parts, max_frame_bytes=self.cfg.max_frame_bytes)
        except ProtocolError as exc:
            self.ledger.received(exc.scan_id)
            self._error(exc.scan_id, exc.frame_id, exc.reason, exc.detail)
            return
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t_recv)
        if isinstance(msg, Frame):
            self.ledger.received(msg.scan_id)
            frame = QueuedFrame(
                msg.scan_id, msg.frame_id, arrays[0], msg.t_acq_ns, t_recv_ns, t_recv, msg.pixel_size, msg.pixel_unit
            )
            for old in self.frames.put(frame):
                self._error(
                    old.scan_id,
                    old.frame_id,
                    "overloaded",
                    f"queue full ({self.cfg.queue_size} frames): dropped the oldest frame to make room for "
                    f"{msg.scan_id}/{msg.frame_id} (overload policy drop_oldest; raise queue_size or use block)",
                )
            self.metrics.queue_depth.set(len(self.frames))
        elif isinstance(msg, ScanStart):
            self.ledger.scan(msg.scan_id)
        elif isinstance(msg, ScanEnd):
            self.ledger.ended(msg.scan_id, msg.n_frames)
            self._maybe_summary(msg.scan_id)
        else:
            ids = {"scan_id": getattr(msg, "scan_id", None), "frame_id": getattr(msg, "frame_id", None)}
            self.ledger.received(ids["scan_id"])
            self._error(ids["scan_id"], ids["frame_id"], "bad_header", f"kind {msg.kind!r} is not an ingest message")

    # ---------------------------------------------------------------- control
    def _reply(self, ok: bool, detail: str = "", **fields: Any) -> None:
        self.rep.send(encode_control(ControlReply(ok=ok, detail=detail, **fields)))

    def _control(self) -> None:
        parts = self.rep.recv_multipart()
        if len(parts) != 1:  # REP must still answer, or the socket is stuck mid-message
            self._reply(False, f"a control request is one JSON frame; got {len(parts)} frames")
            return
        try:
            cmd = decode_control(parts[0])
        except ProtocolError as exc:
            self._reply(False, exc.detail)
            return
        if isinstance(cmd, ReloadCommand):
            self.reload = self.models.start_reload(cmd.artifact)
            self.poller.unregister(self.rep)  # answer this request before taking the next
            return
        pipeline = self.models.pipeline
        if isinstance(cmd, SetCommand):
            if pipeline is None:
                self._reply(False, "no model is loaded yet; retry once /readyz answers 200")
                return
            try:
                updated = self.models.set_defects(classes=cmd.defect_classes, threshold=cmd.defect_threshold)
            except PipelineError as exc:
                self._reply(False, str(exc))
                return
            self._reply(True, **self._defect_fields(updated))
            return
        status = self.status().model_dump(mode="json", exclude={"v", "kind", "seq"})
        self._reply(True, **status, **(self._defect_fields(pipeline) if pipeline is not None else {}))

    @staticmethod
    def _defect_fields(pipeline: Pipeline) -> dict[str, Any]:
        return {
            "defect_classes": [pipeline.class_names[i] for i in pipeline.rule.classes],
            "defect_threshold": pipeline.rule.threshold,
        }

    def _finish_reload(self) -> None:
        job, self.reload = self.reload, None
        if job is None:
            return
        self.poller.register(self.rep, zmq.POLLIN)
        if job.pipeline is None:
            self._reply(False, f"reload of {job.artifact!r} failed, still serving the previous model: {job.error}")
            return
        self.models.install(job.pipeline)
        self._reply(True, f"now serving {job.pipeline.model.name} {job.pipeline.model.version}",
                    model=job.pipeline.model.model_dump())  # fmt: skip
