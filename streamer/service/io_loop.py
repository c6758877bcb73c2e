"""The I/O thread: the one owner of every socket (ZeroMQ sockets are not thread-safe).

One ``Poller`` waits on the ingest PULL, the control REP, the reliable XPUB's subscription frames and the read end of
a local socket pair, the *wake-up pipe*, which other threads write a byte to when they hand the I/O thread something:
the worker took a frame (room in the queue again), a result is in the outbox, a reload finished, stop was requested.
Each turn of the loop, in order: clear the wake-ups, flush what the reliable socket refused earlier, publish the
results in the outbox, answer a control request, read a burst of ingest, finish a reload, send the status heartbeat.

Ingest is decoded and validated here (``protocol.decode``); accepted frames go to the ``FrameQueue``. Reading stops
while the queue is full under ``overload=block`` or a reliable subscriber is behind, so ZeroMQ's high-water marks
push back on the producer. Publishing (``streamer.service.publisher``) and the accounting (``streamer.service.ledger``)
happen here too, so ``seq`` numbering and per-scan counts need no locks.

Nothing one message does may end this loop, because the loop serves everyone: ``decode``/``decode_control`` are
total (any malformed input is a ``ProtocolError``), and a guard around each message and each turn catches whatever
else escapes — the message gets an ``internal`` error (or a control refusal), the exception is logged (rate-limited)
and counted in ``atomstream_internal_errors_total``, and the loop goes on. Rejections, refusals and overload are
logged rate-limited (``streamer.service.throttled_log``); reloads are logged.

Shutdown (``stop``): read what the ingest socket already holds — until it has been quiet for ``_DRAIN_QUIET_S`` (so
messages still arriving from libzmq's TCP buffers are taken too), bounded by ``drain_timeout_s`` — queueing what fits
and answering the rest with an ``overloaded`` error; finish and publish every accepted frame (bounded by
``drain_timeout_s``; frames left then get an ``internal`` error), flush scan summaries and the reliable socket's
pending messages (bounded by ``linger_ms``); the caller then closes the sockets.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from streamer.maps.pipeline import Pipeline, PipelineError
from streamer.service.batching import Batcher
from streamer.service.config import ServiceConfig
from streamer.service.frame_queue import FrameQueue, FrameResult, QueuedFrame
from streamer.service.ledger import Ledger
from streamer.service.metrics import DROP_REASONS, ServiceMetrics
from streamer.service.model_loader import ModelLoader, ReloadJob, ReloadRefusedError
from streamer.service.model_slot import ModelSlot
from streamer.service.publisher import Publisher
from streamer.service.throttled_log import ThrottledLog
from streamer.wire.protocol import (
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
from streamer.wire.sockets import SocketSet

__all__ = ["IOContext", "IOLoop", "WakePipe"]

log = logging.getLogger("atomstream.service")

_INGEST_BURST = 64  # ingest messages read per poller wake-up before the outbox and control get a turn
_MAX_FAILED_TURNS = 100  # turns failing in a row: the loop itself is broken, and the service fails (no hot spin)
_DRAIN_QUIET_S = 0.05  # at shutdown, ingest counts as drained once nothing more arrived for this long


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


@dataclass(frozen=True)
class IOContext:
    """What the I/O thread works with, handed over in one piece by the ``Service`` that built it.

    The loop owns ``sockets``; everything else it shares, each piece with its one owner: the counts (``ledger``), the
    frames waiting for the worker (``frames``), the results coming back (``outbox``, with a byte on ``wake``), the
    model serving now (``slot``; ``models`` loads and installs into it), the worker thread (``worker``, and
    ``batcher`` to stop it early), and the owner's ``stop_requested``. ``started`` (monotonic) is the status uptime's
    zero.
    """

    cfg: ServiceConfig
    sockets: SocketSet
    metrics: ServiceMetrics
    ledger: Ledger
    frames: FrameQueue
    outbox: queue.SimpleQueue[FrameResult]
    slot: ModelSlot
    models: ModelLoader
    batcher: Batcher
    worker: threading.Thread
    wake: WakePipe
    stop_requested: threading.Event
    started: float


class IOLoop:
    """The I/O thread's state and loop; ``run`` returns once a requested stop has drained."""

    def __init__(self, ctx: IOContext) -> None:
        cfg, sockets = ctx.cfg, ctx.sockets
        self.ctx, self.cfg = ctx, cfg
        self.pull, self.rep, self.reliable = sockets.pull, sockets.rep, sockets.reliable
        self.publisher = Publisher(
            sockets.pub, sockets.reliable, block_timeout_s=cfg.reliable_timeout_s, dropped=ctx.metrics.reliable_dropped
        )
        self.events = ThrottledLog(log)
        self.metrics, self.ledger, self.frames, self.outbox = ctx.metrics, ctx.ledger, ctx.frames, ctx.outbox
        self.slot, self.models = ctx.slot, ctx.models
        self.wake, self.wake_fd = ctx.wake, ctx.wake.fileno()
        self.poller = zmq.Poller()
        self.poller.register(self.rep, zmq.POLLIN)
        self.poller.register(self.wake_fd, zmq.POLLIN)
        if self.reliable is not None:
            self.poller.register(self.reliable, zmq.POLLIN)  # subscription frames, read and discarded
        self.reading = False
        self.ingest_open = True
        self.reload: ReloadJob | None = None
        self.answered = True  # the current control request has its reply
        self.drain_deadline: float | None = None
        self.flush_deadline: float | None = None
        self.next_status = time.monotonic()

    # ---------------------------------------------------------------- loop
    def run(self) -> None:
        failed_turns = 0
        while True:
            try:
                if self._turn():
                    return
                failed_turns = 0
            except Exception:  # the last line of defence: whatever escaped one turn must not end the service
                self._internal_error("the I/O loop")
                failed_turns += 1
                if failed_turns >= _MAX_FAILED_TURNS:  # not one bad message but a broken loop: fail loudly
                    raise

    def _internal_error(self, where: str) -> None:
        """Count and log (rate-limited, with the traceback) an exception the loop survived."""
        self.metrics.internal_errors.inc()
        self.events.log(logging.ERROR, f"internal:{where}", "internal error in %s (the loop goes on)", where,
                        exc_info=True)  # fmt: skip

    def _turn(self) -> bool:
        """One turn of the loop; True once a requested stop has drained."""
        publisher = self.publisher
        self._set_reading(self.ingest_open and not self._held_back())
        now = time.monotonic()
        timeout = max(0.0, self.next_status - now)
        if self.drain_deadline is not None and self.flush_deadline is None:
            timeout = min(timeout, max(0.0, self.drain_deadline - now))
        if publisher.holding:
            timeout = min(timeout, max(0.0, publisher.next_retry - now))
        if self.reload is not None:
            timeout = min(timeout, max(0.0, self.reload.deadline - now))
        events = dict(self.poller.poll(timeout * 1000.0))
        if self.wake_fd in events:
            self.wake.clear()
        if self.reliable is not None and self.reliable in events:
            publisher.drain_subscriptions()
        now = time.monotonic()
        if publisher.holding and now >= publisher.next_retry:
            publisher.flush_pending()
        if publisher.holding and publisher.overdue(now):
            n = publisher.give_up(now)
            self.events.warning(
                "reliable", "a publish_reliable subscriber held ingest for %.1f s: dropped %d message(s) for it and "
                "publish lossily there for a while (reliable_timeout_s)", self.cfg.reliable_timeout_s, n,
            )  # fmt: skip
        self._flush_outbox()
        if self.rep in events:
            self._control()
        if self.pull in events:
            self._read_ingest(_INGEST_BURST)
        if self.reload is not None and (self.reload.done.is_set() or now >= self.reload.deadline):
            self._finish_reload()
        now = time.monotonic()
        if now >= self.next_status:
            publisher.publish(self.status())
            self.next_status = max(self.next_status + self.cfg.status_interval_s, now)
        return self.ctx.stop_requested.is_set() and self._shutdown_step()

    def _shutdown_step(self) -> bool:
        """One step of the drain; True when everything accepted has been published."""
        if self.ingest_open:
            self._drain_ingest(time.monotonic() + self.cfg.drain_timeout_s)
            self.ingest_open = False
            self._set_reading(False)
            self.frames.close()
            self.slot.close()  # a worker still waiting for its first model stops waiting
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
        worker_done = not self.ctx.worker.is_alive()
        if not worker_done and time.monotonic() < (self.drain_deadline or 0.0):
            return False
        if self.flush_deadline is None:
            if not worker_done:
                self.ctx.batcher.stop_now()
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

    def _drain_ingest(self, deadline: float) -> None:
        """At shutdown: every message the ingest socket holds, and those still arriving, until it is quiet.

        Frames that fit in the queue are processed; the rest are answered (``overloaded``), so none is lost unseen.
        """
        taken = 0
        while time.monotonic() < deadline:
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if not self.pull.poll(_DRAIN_QUIET_S * 1000.0, zmq.POLLIN):
                    break
                continue
            taken += 1
            self._guarded_ingest(parts, stopping=True)
        if taken:
            log.info("stopping: took %d message(s) still in the ingest socket", taken)

    def _no_room_at_stop(self) -> bool:
        """At shutdown the queue may take what the socket's high-water marks let in (as many frames again as the
        receive side can hold), within its byte limit; the frames beyond are answered instead."""
        frames = self.frames
        return len(frames) >= 4 * self.cfg.recv_hwm + self.cfg.queue_size or frames.nbytes >= self.cfg.max_queue_bytes

    def _held_back(self) -> bool:
        """Ingest waits: the queue is full under ``block``, or a reliable subscriber has not taken everything yet."""
        return self.publisher.holding or (self.cfg.overload == "block" and self.frames.full())

    def _set_reading(self, on: bool) -> None:
        if on != self.reading:
            if on:
                self.poller.register(self.pull, zmq.POLLIN)
            else:
                self.poller.unregister(self.pull)
                if self.ingest_open:
                    self.events.log(
                        logging.INFO, "overload:block", "overloaded: ingest paused (%s); producers are pushed back",
                        "a publish_reliable subscriber is behind" if self.publisher.holding else
                        f"{len(self.frames)} frames, {self.frames.nbytes} bytes queued",
                    )  # fmt: skip
            self.reading = on

    def status(self) -> Status:
        """The heartbeat (and the control ``status`` reply): counts, queue depth, the model serving now."""
        pipeline = self.slot.pipeline
        totals = self.ledger.totals
        return Status(
            seq=0,
            uptime_s=time.monotonic() - self.ctx.started,
            frames_received=totals["received"],
            frames_published=totals["published"],
            frames_rejected=totals["rejected"],
            frames_dropped=totals["dropped"],
            queue_depth=len(self.frames),
            model=pipeline.model if pipeline is not None else None,
            backend=self.models.backend,
            device=self.models.device,
            scan_summary=self.ledger.last_summary,
        )

    # ---------------------------------------------------------------- results and errors
    def _flush_outbox(self) -> None:
        while True:
            try:
                result = self.outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._on_result(result)
            except Exception:
                self._internal_error("publishing a result")
                frame = result.frame
                with contextlib.suppress(Exception):  # best effort: the frame is still accounted for
                    self._error(frame.scan_id, frame.frame_id, "internal", "the service failed to publish its maps")

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
        """Publish an ``error`` for a received frame and count it as rejected or dropped; log it, rate-limited."""
        self.publisher.publish(Error(scan_id=scan_id, frame_id=frame_id, reason=reason, detail=detail))  # type: ignore[arg-type]
        self.ledger.failed(scan_id, reason)
        kind = "dropped" if reason in DROP_REASONS else "rejected"
        self.events.warning(f"{kind}:{reason}", "%s frame (%s): %s", kind, reason, detail[:300])
        self._maybe_summary(scan_id)

    def _maybe_summary(self, scan_id: str | None) -> None:
        summary = self.ledger.summary_due(scan_id)
        if summary is not None:
            self.publisher.publish(summary)

    # ---------------------------------------------------------------- ingest
    def _read_ingest(self, budget: int) -> None:
        for _ in range(budget):
            if self._held_back():
                return
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._guarded_ingest(parts)

    def _guarded_ingest(self, parts: list[zmq.Frame], *, stopping: bool = False) -> None:
        """``_on_ingest``, and if it fails unforeseen, the message still gets its (``internal``) error."""
        before = self.ledger.totals["received"]
        try:
            self._on_ingest(parts, stopping=stopping)
        except Exception:
            self._internal_error("ingest")
            try:
                if self.ledger.totals["received"] == before:
                    self.ledger.received(None)
                self._error(None, None, "internal", "the service failed on this message; it was not processed")
            except Exception:
                self._internal_error("ingest error reply")

    def _on_ingest(self, parts: list[zmq.Frame], *, stopping: bool = False) -> None:
        t_recv_ns, t_recv = time.time_ns(), time.perf_counter()
        try:
            msg, arrays = decode(parts, max_frame_bytes=self.cfg.max_frame_bytes)
            scan_id = getattr(msg, "scan_id", None)
            if isinstance(msg, Frame | ScanStart | ScanEnd) and isinstance(scan_id, str):
                self.ledger.admit(scan_id)
        except ProtocolError as exc:
            self.ledger.received(exc.scan_id)
            self._error(exc.scan_id, exc.frame_id, exc.reason, exc.detail)
            return
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t_recv)
        if isinstance(msg, Frame):
            self.ledger.received(msg.scan_id)
            if stopping and self._no_room_at_stop():
                self._error(msg.scan_id, msg.frame_id, "overloaded", "the service is stopping and its queue is full")
                return
            frame = QueuedFrame(
                msg.scan_id, msg.frame_id, arrays[0], msg.t_acq_ns, t_recv_ns, t_recv, msg.pixel_size, msg.pixel_unit
            )
            for old in self.frames.put(frame):
                self._error(
                    old.scan_id,
                    old.frame_id,
                    "overloaded",
                    f"queue full ({self.cfg.queue_size} frames or {self.cfg.max_queue_bytes} bytes): dropped the "
                    f"oldest frame to make room for {msg.scan_id[:64]}/{msg.frame_id} (overload policy drop_oldest; "
                    "raise queue_size / max_queue_bytes or use block)",
                )
            self.metrics.queue_depth.set(len(self.frames))
            self.metrics.queue_bytes.set(self.frames.nbytes)
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
    def _reply(self, ok: bool, detail: str = "", *, cmd: str = "", **fields: Any) -> None:
        if not ok:
            self.metrics.control_refused.labels(cmd=cmd or "invalid").inc()
            self.events.warning(f"control:{cmd}", "control request %s refused: %s", cmd or "(invalid)", detail[:300])
        self.rep.send(encode_control(ControlReply(ok=ok, detail=detail, **fields)))
        self.answered = True

    def _control(self) -> None:
        try:
            parts = self.rep.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self.answered = False
        try:
            self._command(parts)
        except Exception:
            self._internal_error("control")
            if not self.answered and self.reload is None:  # REP must answer, or the socket is stuck mid-request
                self._reply(False, "internal error while handling this request; see the service log")

    def _command(self, parts: list[bytes]) -> None:
        if len(parts) != 1:  # REP must still answer, or the socket is stuck mid-message
            self._reply(False, f"a control request is one JSON frame; got {len(parts)} frames")
            return
        try:
            cmd = decode_control(parts[0], max_bytes=self.cfg.max_control_bytes)
        except ProtocolError as exc:
            self._reply(False, exc.detail)
            return
        if isinstance(cmd, ReloadCommand):
            try:
                self.reload = self.models.start_reload(cmd.artifact)
            except ReloadRefusedError as exc:
                self._reply(False, str(exc), cmd="reload")
                return
            log.info("reload of %r requested", self.reload.artifact)
            self.poller.unregister(self.rep)  # answer this request before taking the next
            return
        pipeline = self.slot.pipeline
        if isinstance(cmd, SetCommand):
            if pipeline is None:
                self._reply(False, "no model is loaded yet; retry once /readyz answers 200", cmd="set")
                return
            try:
                updated = self.models.set_defects(classes=cmd.defect_classes, threshold=cmd.defect_threshold)
            except PipelineError as exc:
                self._reply(False, str(exc), cmd="set")
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
        if not job.done.is_set():
            log.warning("reload of %r timed out after %.0f s; still serving the previous model", job.artifact,
                        self.cfg.reload_timeout_s)  # fmt: skip
            self._reply(False, f"reload of {job.artifact!r} did not finish within {self.cfg.reload_timeout_s:.0f} s "
                        "(reload_timeout_s); still serving the previous model", cmd="reload")  # fmt: skip
            return
        if job.pipeline is None:
            log.warning("reload of %r failed, still serving the previous model: %s", job.artifact, job.error)
            self._reply(False, f"reload of {job.artifact!r} failed, still serving the previous model: {job.error}",
                        cmd="reload")  # fmt: skip
            return
        self.models.install(job.pipeline)
        model = job.pipeline.model
        log.info("reloaded: now serving %s %s (sha256 %s) from %r", model.name, model.version, model.sha256[:16],
                 job.artifact)  # fmt: skip
        self._reply(True, f"now serving {model.name} {model.version}", model=model.model_dump())
