"""The live service: ZeroMQ in, maps out (wire protocol v1, DESIGN.md).

Threads — ZeroMQ sockets are not thread-safe, so each has exactly one owner:

* **I/O thread** (``atomstream-io``) owns *every* socket: ingest PULL, publish PUB, control REP. One ``Poller``
  waits on the three and on the read end of a local socket pair, the *wake-up pipe*. It decodes and validates
  ingest (``protocol.decode``), queues frames, answers control requests, publishes everything (maps, defects,
  errors, status heartbeats, scan summaries) and keeps the counts — so ``seq`` numbering and per-scan accounting
  need no locks.
* **Worker thread** (``atomstream-worker``, ``streamer.batching.Batcher``) owns the device work: it takes frames
  from the bounded ``FrameQueue``, batches patches across frames, encodes and assembles, and hands each result to the
  I/O thread through a thread-safe outbox, writing one byte to the wake-up pipe so the poller returns at once.
* **Loader threads** (short-lived) load an artifact at start and on ``reload``, so a slow load never stalls ingest;
  the REP socket waits for the result before answering (REP allows one request at a time anyway).
* the metrics HTTP server runs in its own thread (``streamer.metrics``).

An exception that escapes a thread's loop is kept and re-raised, wrapped in ``ServiceError``, by ``wait_ready``,
``check`` and ``stop`` on the owner's thread; per-frame failures are ``error`` messages instead and the service
goes on.

Accounting. ``frames_received`` counts every ingest message except well-formed ``scan_start``/``scan_end``;
each one ends as exactly one ``maps`` (+ ``defects``) or one ``error``. *Rejected*: bad input (any ``ProtocolError``
reason, or a frame too small for the model's patch: ``shape_mismatch``). *Dropped*: a good frame the service could
not process (``overloaded``, ``internal``). A scan's ``scan_summary`` is published once its ``scan_end`` arrived and
every frame of that scan received before it has been published, rejected or dropped.

Reliable publishing (``publish_reliable``). PUB drops for a subscriber ``send_hwm`` behind, so a stuck viewer never
stalls ingest. The optional extra XPUB socket (``XPUB_NODROP``) refuses instead: every published message also goes to
it without blocking, and what it refuses waits, in order, in a pending deque while the I/O thread stops reading ingest
(the back-pressure of ``overload=block``) until the deque is flushed. libzmq reports XPUB as always writable, so the
flush is retried on a short backing-off timer rather than on ``POLLOUT``. Its subscription frames are read and
discarded (XPUB hands them up; nobody else wants them).

Shutdown (``stop``, SIGTERM in ``atomstream serve``): stop reading ingest after taking what already arrived in the
socket's queue, finish and publish every accepted frame (bounded by ``drain_timeout_s``; frames left then get an
``internal`` error), flush scan summaries and the reliable socket's pending deque (bounded by ``linger_ms``), close the
publishing sockets with ``linger_ms`` so subscribers receive the tail.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import zmq

from streamer.batching import Batcher, FrameQueue, FrameResult, QueuedFrame
from streamer.config import ServiceConfig
from streamer.metrics import DROP_REASONS, MetricsServer, ServiceMetrics
from streamer.pipeline import EncoderLike, Pipeline, PipelineError
from streamer.protocol import (
    ControlReply,
    Error,
    Frame,
    ModelRef,
    ProtocolError,
    ReloadCommand,
    ScanEnd,
    ScanStart,
    ScanSummary,
    SetCommand,
    Status,
    decode,
    decode_control,
    encode_control,
    encode_published,
)

__all__ = ["Service", "ServiceError"]

log = logging.getLogger("atomstream.service")

_INGEST_BURST = 64  # ingest messages read per poller wake-up before the outbox and control get a turn
_BIND_TIMEOUT_S = 30.0
_MAX_OPEN_SCANS = 10_000
_RETRY_MIN_S, _RETRY_MAX_S = 0.0005, 0.01  # reliable-socket flush retries back off between these while refused


class ServiceError(RuntimeError):
    """The service cannot run (bad endpoint, artifact refused, a thread died); the cause is chained."""


@dataclass
class _Scan:
    received: int = 0
    published: int = 0
    rejected: int = 0
    dropped: int = 0
    ended: bool = False
    n_frames: int | None = None

    @property
    def pending(self) -> int:
        return self.received - self.published - self.rejected - self.dropped


@dataclass
class _Reload:
    """A reload in progress on a loader thread; the I/O thread replies once ``done`` is set."""

    artifact: str
    done: threading.Event = field(default_factory=threading.Event)
    pipeline: Pipeline | None = None
    error: BaseException | None = None


def _bindable(endpoint: str) -> str:
    """``tcp://host:0`` → ``tcp://host:*`` (ZeroMQ's spelling of "any free port")."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-2] + ":*"
    return endpoint


class Service:
    """The streaming service; a context manager with ``start`` / ``wait_ready`` / ``stop``.

    ``encoder``: use this (already loaded) encoder instead of loading ``cfg.artifact``; ``reload`` still loads
    artifacts with ``cfg.backend`` and ``cfg.device``.
    """

    def __init__(self, cfg: ServiceConfig, *, encoder: EncoderLike | None = None) -> None:
        if encoder is None and cfg.artifact is None:
            raise ServiceError("no model: set the artifact directory (--artifact DIR) or pass an encoder")
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        self._encoder = encoder
        self._queue = FrameQueue(cfg.queue_size, cfg.overload)
        self._outbox: queue.SimpleQueue[FrameResult] = queue.SimpleQueue()
        self._batcher = Batcher(
            self._queue,
            emit=self._post,
            on_take=self._on_take,
            metrics=self.metrics,
            max_batch_patches=cfg.max_batch_patches,
            max_wait_ms=cfg.max_wait_ms,
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._defect_classes: list[str | int] | None = cfg.defect_classes
        self._endpoints: dict[str, str] = {}
        self._bound = threading.Event()
        self._stop_requested = threading.Event()
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._io_thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._metrics_server: MetricsServer | None = None
        self._started = self._stopped = False
        self._t0 = time.monotonic()
        self._seq = {"maps": 0, "defects": 0, "error": 0, "status": 0, "scan_summary": 0}
        self._counts = {"received": 0, "published": 0, "rejected": 0, "dropped": 0}
        self._scans: dict[str, _Scan] = {}
        self._backend = encoder.backend if encoder is not None else cfg.backend
        self._device = encoder.device if encoder is not None else cfg.device

    # ------------------------------------------------------------------ owner API
    def start(self) -> Service:
        if self._started:
            raise ServiceError("the service was already started; create a new Service to start again")
        given: Pipeline | None = None
        if self._encoder is not None:
            try:
                given = self._build_pipeline(self._encoder)
            except PipelineError as exc:
                raise ServiceError(f"cannot serve this encoder: {exc}") from exc
        self._started = True
        self._t0 = time.monotonic()
        # daemon threads: an encoder stuck in a driver call must not keep the process alive after stop() gave up
        self._io_thread = threading.Thread(target=self._guard, args=(self._io_main,), name="atomstream-io", daemon=True)
        self._worker = threading.Thread(
            target=self._guard, args=(self._batcher.run,), name="atomstream-worker", daemon=True
        )
        self._threads = [self._io_thread, self._worker]
        self._io_thread.start()
        expected = 3 + (self.cfg.publish_reliable is not None)
        if not self._bound.wait(_BIND_TIMEOUT_S) or len(self._endpoints) < expected:
            self._stop_requested.set()
            self._io_thread.join(_BIND_TIMEOUT_S)  # it is exiting: its failure is recorded once it has
            self._wake_r.close()
            self._wake_w.close()
            raise ServiceError(f"the service could not start: {self._failure}") from self._failure
        self._worker.start()
        if self.cfg.metrics_port is not None:
            try:
                self._metrics_server = MetricsServer(
                    self.metrics,
                    host=self.cfg.metrics_host,
                    port=self.cfg.metrics_port,
                    healthy=self.healthy,
                    ready=self.ready,
                ).start()
            except OSError as exc:
                self._fail(
                    ServiceError(
                        f"cannot serve metrics on {self.cfg.metrics_host}:{self.cfg.metrics_port}: {exc}; "
                        "choose another metrics_port (0: a free one) or null to disable"
                    )
                )
                self.stop()
        if given is not None:
            self._install(given)
        else:
            loader = threading.Thread(
                target=self._guard, args=(self._initial_load,), name="atomstream-load", daemon=True
            )
            self._threads.append(loader)
            loader.start()
        return self

    def wait_ready(self, timeout: float) -> None:
        """Block until a model is loaded and the sockets are bound; re-raises a thread's failure."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            self.check()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the service was not ready within {timeout} s (model still loading?)")
            with self._queue.cond:
                self._queue.cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        self.check()

    def check(self) -> None:
        """Raise ``ServiceError`` if a thread of the service has failed."""
        if self._failure is not None:
            raise ServiceError(f"the service failed: {type(self._failure).__name__}: {self._failure}") from (
                self._failure
            )

    def stop(self) -> None:
        """Stop ingest, publish everything in flight, close the sockets; re-raises a thread's failure."""
        if not self._started or self._stopped:
            self.check()
            return
        self._stopped = True
        self._stop_requested.set()
        self._wake()
        budget = self.cfg.drain_timeout_s + self.cfg.linger_ms / 1000.0 + 10.0
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(budget)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._wake_r.close()
        self._wake_w.close()
        stuck = [t.name for t in self._threads if t.ident is not None and t.is_alive()]
        if stuck and self._failure is None:
            self._fail(ServiceError(f"threads {stuck} did not finish within {budget:.0f} s"))
        self.check()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def healthy(self) -> bool:
        return self._io_thread is not None and self._io_thread.is_alive() and self._failure is None

    def ready(self) -> bool:
        return self._bound.is_set() and self._batcher.pipeline is not None and self._failure is None

    @property
    def ingest_endpoint(self) -> str:
        return self._endpoint("ingest")

    @property
    def publish_endpoint(self) -> str:
        return self._endpoint("publish")

    @property
    def control_endpoint(self) -> str:
        return self._endpoint("control")

    @property
    def publish_reliable_endpoint(self) -> str | None:
        """The bound reliable XPUB endpoint, ``None`` when ``publish_reliable`` is off."""
        return self._endpoint("publish_reliable") if self.cfg.publish_reliable is not None else None

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port`` of the metrics endpoint, ``None`` when disabled."""
        return self._metrics_server.url if self._metrics_server is not None else None

    @property
    def counts(self) -> dict[str, int]:
        """Frames received, published, rejected and dropped since start (a snapshot)."""
        return {f"frames_{name}": value for name, value in dict(self._counts).items()}

    @property
    def model(self) -> ModelRef | None:
        pipeline = self._batcher.pipeline
        return pipeline.model if pipeline is not None else None

    def _endpoint(self, name: str) -> str:
        if name not in self._endpoints:
            raise ServiceError(f"the {name} socket is not bound yet; call start() first")
        return self._endpoints[name]

    # ------------------------------------------------------------------ threads
    def _guard(self, target: Any) -> None:
        try:
            target()
        except BaseException as exc:
            name = threading.current_thread().name
            if name == "atomstream-load":  # a refused artifact: its message says it all
                log.error("cannot load the model: %s", exc)
            else:
                log.exception("service thread %s failed", name)
            self._fail(exc)
        finally:
            self._wake()  # the I/O thread's drain waits for the worker to end: tell it now, not at the next heartbeat

    def _fail(self, exc: BaseException) -> None:
        with self._failure_lock:
            if self._failure is None:
                self._failure = exc
        self._stop_requested.set()
        self._queue.close()
        self._wake()

    def _wake(self) -> None:
        # a full pipe means the poller wakes anyway; a closed one means we are shutting down
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _on_take(self) -> None:
        """The worker took a frame: there may be room in the queue again (``block`` policy) — tell the poller."""
        self.metrics.queue_depth.set(len(self._queue))
        self._wake()

    def _post(self, result: FrameResult) -> None:
        self._outbox.put(result)
        self._wake()

    def _build_pipeline(self, encoder: EncoderLike) -> Pipeline:
        current = self._batcher.pipeline
        return Pipeline(
            encoder,
            defect_classes=self._defect_classes,
            defect_threshold=current.rule.threshold if current is not None else self.cfg.defect_threshold,
            connectivity=self.cfg.connectivity,
            max_batch_patches=self.cfg.max_batch_patches,
        )

    def _load(self, artifact: str) -> EncoderLike:
        from streamer.encoder import load

        return load(
            artifact,
            backend=self.cfg.backend,
            device=self.cfg.device,
            batch_sizes=(1, self.cfg.max_batch_patches),
        )

    def _initial_load(self) -> None:
        assert self.cfg.artifact is not None
        self._install(self._build_pipeline(self._load(str(self.cfg.artifact))))

    def _install(self, pipeline: Pipeline) -> None:
        self._backend, self._device = pipeline.encoder.backend, pipeline.encoder.device
        self.metrics.set_model(pipeline.model, backend=self._backend, device=self._device)
        self._batcher.set_pipeline(pipeline)

    def _run_reload(self, job: _Reload) -> None:
        try:
            job.pipeline = self._build_pipeline(self._load(job.artifact))
        except Exception as exc:
            job.error = exc
        finally:
            job.done.set()
            self._wake()

    # ------------------------------------------------------------------ I/O thread
    def _io_main(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sockets: list[zmq.Socket[bytes]] = []
        auth = None
        try:
            pull, pub, rep = (ctx.socket(kind) for kind in (zmq.PULL, zmq.PUB, zmq.REP))
            sockets = [pull, pub, rep]
            names = ["ingest", "publish", "control"]
            reliable: zmq.Socket[bytes] | None = None
            if self.cfg.publish_reliable is not None:
                reliable = ctx.socket(zmq.XPUB)
                sockets.append(reliable)
                names.append("publish_reliable")
                reliable.setsockopt(zmq.XPUB_NODROP, 1)
                reliable.setsockopt(zmq.SNDHWM, self.cfg.send_hwm)
            pull.setsockopt(zmq.RCVHWM, self.cfg.recv_hwm)
            pub.setsockopt(zmq.SNDHWM, self.cfg.send_hwm)
            for s in sockets:
                s.setsockopt(zmq.LINGER, 0)
            for s in (pub, reliable):
                if s is not None:
                    s.setsockopt(zmq.LINGER, self.cfg.linger_ms)
            if self.cfg.curve is not None:
                from streamer.security import secure_server_socket, server_auth

                auth = server_auth(ctx, self.cfg.curve)
                for s in sockets:
                    secure_server_socket(s, self.cfg.curve)
            for name, s in zip(names, sockets, strict=True):
                endpoint = getattr(self.cfg, name)
                if name == "publish" and self.cfg.publish_connect:
                    try:
                        s.connect(endpoint)
                    except zmq.ZMQError as exc:
                        raise ServiceError(
                            f"cannot connect the publish socket to {endpoint!r}: {exc}; give the proxy's XSUB "
                            "endpoint, e.g. 'tcp://127.0.0.1:5560'"
                        ) from None
                    self._endpoints[name] = endpoint
                    continue
                try:
                    s.bind(_bindable(endpoint))
                except zmq.ZMQError as exc:
                    raise ServiceError(
                        f"cannot bind the {name} socket to {endpoint!r}: {exc}; is another service using it? "
                        "(port 0 picks a free port)"
                    ) from None
                self._endpoints[name] = s.getsockopt_string(zmq.LAST_ENDPOINT)
            self._bound.set()
            _IOLoop(self, pull, pub, rep, reliable).run()
        finally:
            self._bound.set()
            self._queue.close()
            for s in sockets:
                s.close()  # each with its own linger: the publishing sockets flush the tail to subscribers
            if auth is not None:
                auth.stop()
            ctx.term()

    # accounting, all on the I/O thread
    def _scan(self, scan_id: str | None) -> _Scan | None:
        if scan_id is None:
            return None
        scan = self._scans.get(scan_id)
        if scan is None:
            if len(self._scans) >= _MAX_OPEN_SCANS:  # producers that never send scan_end must not grow memory
                stale = next(iter(self._scans))
                log.warning("forgetting scan %r (no scan_end among the last %d scans)", stale, _MAX_OPEN_SCANS)
                del self._scans[stale]
            scan = self._scans[scan_id] = _Scan()
        return scan

    def _status(self) -> Status:
        pipeline = self._batcher.pipeline
        return Status(
            seq=0,
            uptime_s=time.monotonic() - self._t0,
            frames_received=self._counts["received"],
            frames_published=self._counts["published"],
            frames_rejected=self._counts["rejected"],
            frames_dropped=self._counts["dropped"],
            queue_depth=len(self._queue),
            model=pipeline.model if pipeline is not None else None,
            backend=self._backend,
            device=self._device,
        )


class _IOLoop:
    """The I/O thread's state and loop (sockets owned here only; see the module docstring)."""

    def __init__(
        self,
        service: Service,
        pull: zmq.Socket[bytes],
        pub: zmq.Socket[bytes],
        rep: zmq.Socket[bytes],
        reliable: zmq.Socket[bytes] | None = None,
    ):
        self.s = service
        self.cfg = service.cfg
        self.pull, self.pub, self.rep, self.reliable = pull, pub, rep, reliable
        self.pending: deque[list[bytes | memoryview]] = deque()  # refused by the reliable socket, oldest first
        self.retry_s = _RETRY_MIN_S
        self.next_retry = 0.0
        self.poller = zmq.Poller()
        self.poller.register(rep, zmq.POLLIN)
        self.poller.register(service._wake_r, zmq.POLLIN)
        if reliable is not None:
            self.poller.register(reliable, zmq.POLLIN)  # subscription frames, read and discarded
        self.reading = False
        self.ingest_open = True
        self.reload: _Reload | None = None
        self.drain_deadline: float | None = None
        self.flush_deadline: float | None = None

    # ---------------------------------------------------------------- loop
    def run(self) -> None:
        s = self.s
        next_status = time.monotonic()
        while True:
            self._set_reading(self.ingest_open and not self._held_back())
            now = time.monotonic()
            timeout = max(0.0, next_status - now)
            if self.drain_deadline is not None and self.flush_deadline is None:
                timeout = min(timeout, max(0.0, self.drain_deadline - now))
            if self.pending:
                timeout = min(timeout, max(0.0, self.next_retry - now))
            events = dict(self.poller.poll(timeout * 1000.0))
            if s._wake_r in events:
                self._clear_wakeups()
            if self.reliable is not None and self.reliable in events:
                self._drain_subscriptions()
            if self.pending and time.monotonic() >= self.next_retry:
                self._flush_pending()
            self._flush_outbox()
            if self.rep in events:
                self._control()
            if self.pull in events:
                self._read_ingest(_INGEST_BURST)
            if self.reload is not None and self.reload.done.is_set():
                self._finish_reload()
            now = time.monotonic()
            if now >= next_status:
                self._publish(s._status())
                next_status = max(next_status + self.cfg.status_interval_s, now)
            if s._stop_requested.is_set() and self._shutdown_step():
                return

    def _shutdown_step(self) -> bool:
        """One step of the drain; True when everything accepted has been published."""
        s = self.s
        if self.ingest_open:
            self._read_ingest(4 * self.cfg.recv_hwm + self.cfg.queue_size, ignore_full=True)
            self.ingest_open = False
            self._set_reading(False)
            s._queue.close()
            self.drain_deadline = time.monotonic() + self.cfg.drain_timeout_s
        assert s._worker is not None
        worker_done = not s._worker.is_alive()
        if not worker_done and time.monotonic() < (self.drain_deadline or 0.0):
            return False
        if self.flush_deadline is None:
            if not worker_done:
                s._batcher.stop_now()
            self._flush_outbox()
            for frame in s._queue.drain():  # only left when the worker died or the drain timed out
                self._on_result(FrameResult(frame, reason="internal", detail="the service stopped before encoding it"))
            if self.reload is not None:
                self.reload.done.wait(self.cfg.drain_timeout_s)
                self._finish_reload()
            self.flush_deadline = time.monotonic() + self.cfg.linger_ms / 1000.0
        if self.pending and time.monotonic() < self.flush_deadline:
            return False  # a reliable subscriber is still behind: the loop keeps retrying until linger_ms
        if self.pending:
            log.warning("a reliable subscriber was behind at shutdown: %d messages not sent", len(self.pending))
        return True

    def _held_back(self) -> bool:
        """Ingest waits: the queue is full under ``block``, or a reliable subscriber has not taken everything yet."""
        return bool(self.pending) or (self.cfg.overload == "block" and self.s._queue.full())

    def _set_reading(self, on: bool) -> None:
        if on != self.reading:
            if on:
                self.poller.register(self.pull, zmq.POLLIN)
            else:
                self.poller.unregister(self.pull)
            self.reading = on

    def _clear_wakeups(self) -> None:
        try:
            while self.s._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # ---------------------------------------------------------------- publishing
    def _publish(self, msg: Any, arrays: list[np.ndarray] | None = None) -> None:
        topic = msg.kind
        msg = msg.model_copy(update={"seq": self.s._seq[topic]})
        self.s._seq[topic] += 1
        self._send(encode_published(msg, *(arrays or [])))

    def _send(self, parts: list[bytes | memoryview]) -> None:
        """To every PUB subscriber (lossy), and to the reliable socket in order (queued while it refuses)."""
        self.pub.send_multipart(parts, copy=False)
        if self.reliable is None:
            return
        if not self.pending:
            try:
                self.reliable.send_multipart(parts, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:  # a subscriber is send_hwm behind: hold ingest back until it catches up
                self.retry_s = _RETRY_MIN_S
                self.next_retry = time.monotonic() + self.retry_s
                self._set_reading(False)
        self.pending.append(parts)

    def _flush_pending(self) -> None:
        """Send what the reliable socket refused, oldest first; back off while it still refuses."""
        assert self.reliable is not None
        progressed = False
        while self.pending:
            try:
                self.reliable.send_multipart(self.pending[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.retry_s = _RETRY_MIN_S if progressed else min(2 * self.retry_s, _RETRY_MAX_S)
                self.next_retry = time.monotonic() + self.retry_s
                return
            self.pending.popleft()
            progressed = True

    def _drain_subscriptions(self) -> None:
        assert self.reliable is not None
        with contextlib.suppress(zmq.Again):
            while True:
                self.reliable.recv(zmq.NOBLOCK)

    def _flush_outbox(self) -> None:
        while True:
            try:
                result = self.s._outbox.get_nowait()
            except queue.Empty:
                return
            self._on_result(result)

    def _on_result(self, result: FrameResult) -> None:
        s, frame = self.s, result.frame
        if result.maps is None:
            self._error(frame.scan_id, frame.frame_id, result.reason or "internal", result.detail)
            return
        t0 = time.perf_counter()
        maps = result.maps
        header = maps.maps_message(
            scan_id=frame.scan_id,
            frame_id=frame.frame_id,
            seq=s._seq["maps"],
            t_acq_ns=frame.t_acq_ns,
            t_recv_ns=frame.t_recv_ns,
            t_pub_ns=time.time_ns(),
        )
        s._seq["maps"] += 1
        self._send(encode_published(header, *maps.buffers()))
        self._publish(maps.defects_message(scan_id=frame.scan_id, frame_id=frame.frame_id, seq=0))
        done = time.perf_counter()
        s.metrics.stage_seconds.labels(stage="publish").observe(done - t0)
        s.metrics.end_to_end_seconds.observe(done - frame.t_recv)
        s.metrics.frames_published.inc()
        s._counts["published"] += 1
        scan = s._scan(frame.scan_id)
        assert scan is not None
        scan.published += 1
        self._maybe_summary(frame.scan_id)

    def _error(self, scan_id: str | None, frame_id: int | None, reason: str, detail: str) -> None:
        """Publish an ``error`` for a received frame and count it as rejected or dropped."""
        s = self.s
        self._publish(Error(scan_id=scan_id, frame_id=frame_id, reason=reason, detail=detail))  # type: ignore[arg-type]
        kind = "dropped" if reason in DROP_REASONS else "rejected"
        counter = s.metrics.frames_dropped if kind == "dropped" else s.metrics.frames_rejected
        counter.labels(reason=reason).inc()
        s._counts[kind] += 1
        scan = s._scans.get(scan_id) if scan_id is not None else None
        if scan is not None:
            setattr(scan, kind, getattr(scan, kind) + 1)
            self._maybe_summary(scan_id)

    def _maybe_summary(self, scan_id: str | None) -> None:
        scan = self.s._scans.get(scan_id) if scan_id is not None else None
        if scan is None or not scan.ended or scan.pending > 0:
            return
        assert scan_id is not None
        del self.s._scans[scan_id]
        self._publish(
            ScanSummary(
                scan_id=scan_id,
                n_frames=scan.n_frames,
                frames_received=scan.received,
                frames_published=scan.published,
                frames_rejected=scan.rejected,
                frames_dropped=scan.dropped,
            )
        )

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
        s = self.s
        t_recv_ns, t_recv = time.time_ns(), time.perf_counter()
        try:
            msg, arrays = decode(parts, max_frame_bytes=self.cfg.max_frame_bytes)
        except ProtocolError as exc:
            self._count_received(exc.scan_id)
            self._error(exc.scan_id, exc.frame_id, exc.reason, exc.detail)
            return
        s.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t_recv)
        if isinstance(msg, Frame):
            self._count_received(msg.scan_id)
            frame = QueuedFrame(msg.scan_id, msg.frame_id, arrays[0], msg.t_acq_ns, t_recv_ns, t_recv)
            for old in s._queue.put(frame):
                self._error(
                    old.scan_id,
                    old.frame_id,
                    "overloaded",
                    f"queue full ({self.cfg.queue_size} frames): dropped the oldest frame to make room for "
                    f"{msg.scan_id}/{msg.frame_id} (overload policy drop_oldest; raise queue_size or use block)",
                )
            s.metrics.queue_depth.set(len(s._queue))
        elif isinstance(msg, ScanStart):
            s._scan(msg.scan_id)
        elif isinstance(msg, ScanEnd):
            scan = s._scan(msg.scan_id)
            assert scan is not None
            scan.ended, scan.n_frames = True, msg.n_frames
            self._maybe_summary(msg.scan_id)
        else:
            ids = {"scan_id": getattr(msg, "scan_id", None), "frame_id": getattr(msg, "frame_id", None)}
            self._count_received(ids["scan_id"])
            self._error(ids["scan_id"], ids["frame_id"], "bad_header", f"kind {msg.kind!r} is not an ingest message")

    def _count_received(self, scan_id: str | None) -> None:
        self.s.metrics.frames_received.inc()
        self.s._counts["received"] += 1
        scan = self.s._scan(scan_id)
        if scan is not None:
            scan.received += 1

    # ---------------------------------------------------------------- control
    def _reply(self, ok: bool, detail: str = "", **fields: Any) -> None:
        self.rep.send(encode_control(ControlReply(ok=ok, detail=detail, **fields)))

    def _control(self) -> None:
        s = self.s
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
            job = _Reload(cmd.artifact)
            thread = threading.Thread(target=s._run_reload, args=(job,), name="atomstream-reload", daemon=True)
            self.reload = job
            self.poller.unregister(self.rep)  # answer this request before taking the next
            thread.start()
            return
        pipeline = s._batcher.pipeline
        if isinstance(cmd, SetCommand):
            if pipeline is None:
                self._reply(False, "no model is loaded yet; retry once /readyz answers 200")
                return
            try:
                updated = pipeline.with_defects(classes=cmd.defect_classes, threshold=cmd.defect_threshold)
            except PipelineError as exc:
                self._reply(False, str(exc))
                return
            if cmd.defect_classes is not None:
                s._defect_classes = list(cmd.defect_classes)
            s._batcher.set_pipeline(updated)
            self._reply(True, **self._defect_fields(updated))
            return
        status = s._status().model_dump(mode="json", exclude={"v", "kind", "seq"})
        self._reply(True, **status, **(self._defect_fields(pipeline) if pipeline is not None else {}))

    @staticmethod
    def _defect_fields(pipeline: Pipeline) -> dict[str, Any]:
        return {
            "defect_classes": [pipeline.class_names[i] for i in pipeline.rule.classes],
            "defect_threshold": pipeline.rule.threshold,
        }

    def _finish_reload(self) -> None:
        job, self.reload = self.reload, None
        assert job is not None
        self.poller.register(self.rep, zmq.POLLIN)
        if job.pipeline is None:
            error = job.error
            self._reply(False, f"reload of {job.artifact!r} failed, still serving the previous model: {error}")
            return
        self.s._install(job.pipeline)
        self._reply(True, f"now serving {job.pipeline.model.name} {job.pipeline.model.version}",
                    model=job.pipeline.model.model_dump())  # fmt: skip
