"""The live service: ZeroMQ in, maps out (wire protocol v1, DESIGN.md) — its owner-facing facade and its threads.

Threads, and the module holding each one's work:

* **I/O thread** (``atomstream-io``, ``streamer.service.io_loop``) owns *every* socket (``streamer.wire.sockets``):
  ingest PULL, publish PUB (+ the optional reliable XPUB, ``streamer.service.publisher``), control REP. It decodes and
  validates ingest, queues frames, answers control requests, publishes everything (maps, defects, errors, status
  heartbeats, scan summaries) and keeps the counts (``streamer.service.ledger``) — so ``seq`` numbering and per-scan
  accounting need no locks. Other threads wake it through a local socket pair (``io_loop.WakePipe``).
* **Worker thread** (``atomstream-worker``, ``streamer.service.batching``) takes frames from the bounded ``FrameQueue``
  (``streamer.service.frame_queue``), batches patches across frames and writes them into the encoder's batch buffers;
* **Encoder thread** (``atomstream-encode``, ``streamer.service.encode_stage``) encodes those buffers, assembles maps
  and hands each result to the I/O thread through a thread-safe outbox.
* **Loader threads** (short-lived, ``streamer.service.model_loader``) load an artifact at start and on ``reload``, so a
  slow load never stalls ingest.
* the metrics HTTP server runs in its own thread (``streamer.service.metrics``).

An exception that escapes a thread's loop is kept and re-raised, wrapped in ``ServiceError``, by ``wait_ready``,
``check`` and ``stop`` on the owner's thread; per-frame failures are ``error`` messages instead and the service
goes on. Accounting (what counts as received, published, rejected, dropped; when a ``scan_summary`` goes out) is
documented in ``streamer.service.ledger``, publishing and its reliable socket in ``streamer.service.publisher``, the
shutdown drain in ``streamer.service.io_loop``. ``stop`` (SIGTERM in ``atomstream serve``) stops ingest, publishes
everything accepted, then closes the sockets with ``linger_ms`` so subscribers receive the tail.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from streamer.maps.pipeline import EncoderLike, Pipeline, PipelineError
from streamer.service.batching import Batcher
from streamer.service.config import ServiceConfig
from streamer.service.frame_queue import FrameQueue, FrameResult
from streamer.service.io_loop import IOContext, IOLoop, WakePipe
from streamer.service.ledger import Ledger
from streamer.service.metrics import MetricsServer, ServiceMetrics
from streamer.service.model_loader import ModelLoader
from streamer.service.model_slot import ModelSlot
from streamer.wire.protocol import ModelRef
from streamer.wire.security import SecurityError, is_loopback
from streamer.wire.sockets import SocketError, open_sockets

__all__ = ["Service", "ServiceError"]

log = logging.getLogger("atomstream.service")

_BIND_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """The service cannot run (bad endpoint, artifact refused, a thread died); the cause is chained."""


class Service:
    """The streaming service; a context manager with ``start`` / ``wait_ready`` / ``stop``.

    ``encoder``: use this (already loaded) encoder instead of loading ``cfg.artifact``; ``reload`` still loads
    artifacts with ``cfg.backend`` and ``cfg.device``.
    """

    def __init__(self, cfg: ServiceConfig, *, encoder: EncoderLike | None = None) -> None:
        if encoder is None and cfg.artifact is None:
            raise ServiceError("no model: set ServiceConfig.artifact (the artifact directory) or pass an encoder")
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        self._encoder = encoder
        self._queue = FrameQueue(cfg.queue_size, cfg.overload, max_bytes=cfg.max_queue_bytes)
        self._outbox: queue.SimpleQueue[FrameResult] = queue.SimpleQueue()
        self._wake = WakePipe()
        self._slot = ModelSlot()
        self._batcher = Batcher(
            self._queue,
            self._slot,
            emit=self._post,
            on_take=self._on_take,
            metrics=self.metrics,
            max_batch_patches=cfg.max_batch_patches,
            max_wait_ms=cfg.max_wait_ms,
        )
        self._models = ModelLoader(
            cfg,
            slot=self._slot,
            metrics=self.metrics,
            backend=encoder.backend if encoder is not None else cfg.backend,
            device=encoder.device if encoder is not None else cfg.device,
            on_done=self._wake.wake,
        )
        self._ledger = Ledger(
            self.metrics,
            max_open_scans=cfg.max_open_scans,
            max_id_chars=cfg.max_scan_id_chars,
            idle_s=cfg.scan_idle_s,
        )
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

    # ------------------------------------------------------------------ owner API
    def start(self) -> Service:
        if self._started:
            raise ServiceError("the service was already started; create a new Service to start again")
        given: Pipeline | None = None
        if self._encoder is not None:
            try:
                given = self._models.build(self._encoder)
            except PipelineError as exc:
                raise ServiceError(f"cannot serve this encoder: {exc}") from exc
        self._started = True
        self._t0 = time.monotonic()
        self._warn_exposure()
        # daemon threads: an encoder stuck in a driver call must not keep the process alive after stop() gave up
        self._io_thread = self._thread(self._io_main, "atomstream-io")
        self._worker = self._thread(self._batcher.run, "atomstream-worker")
        self._threads = [self._io_thread, self._worker]
        self._io_thread.start()
        expected = 3 + (self.cfg.publish_reliable is not None)
        if not self._bound.wait(_BIND_TIMEOUT_S) or len(self._endpoints) < expected:
            self._stop_requested.set()
            self._io_thread.join(_BIND_TIMEOUT_S)  # it is exiting: its failure is recorded once it has
            self._wake.close()
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
            self._models.install(given)
        else:
            loader = self._thread(self._models.load_configured, "atomstream-load")
            self._threads.append(loader)
            loader.start()
        return self

    def _warn_exposure(self) -> None:
        """Loud, once: what is reachable from the network without authentication."""
        exposed = self.cfg.exposed_endpoints
        if self.cfg.curve is None and exposed:
            log.warning(
                "INSECURE: %s listen beyond loopback without CURVE: anyone who can reach them may inject frames, read "
                "maps and reload models (insecure is set); configure curve for any network you do not fully trust",
                ", ".join(exposed),
            )
        if self.cfg.metrics_port is not None and not is_loopback(f"tcp://{self.cfg.metrics_host}:0"):
            log.warning(
                "metrics HTTP on %s:%s is reachable beyond loopback and has no authentication (it is read-only: "
                "counts, model name and sha256)",
                self.cfg.metrics_host,
                self.cfg.metrics_port,
            )

    def wait_ready(self, timeout: float) -> None:
        """Block until a model is loaded and the sockets are bound; re-raises a thread's failure."""
        deadline = time.monotonic() + timeout
        self._bound.wait(timeout)
        self._slot.wait(max(0.0, deadline - time.monotonic()))  # a failure closes the slot: no waiting it out
        self.check()
        if not self.ready():
            raise TimeoutError(f"the service was not ready within {timeout} s (model still loading?)")

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
        self._wake.wake()
        budget = self.cfg.drain_timeout_s + self.cfg.linger_ms / 1000.0 + 10.0
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(budget)
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self._wake.close()
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
        return self._bound.is_set() and self._slot.ready.is_set() and self._failure is None

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
        return {f"frames_{name}": value for name, value in dict(self._ledger.totals).items()}

    @property
    def model(self) -> ModelRef | None:
        pipeline = self._slot.pipeline
        return pipeline.model if pipeline is not None else None

    @property
    def encoder(self) -> dict[str, Any] | None:
        """Where the model runs — backend, device and ONNX Runtime's providers in order — for an operator reading the
        start-up line: ``--device auto`` with the CPU build of onnxruntime serves on the CPU even beside a GPU."""
        pipeline = self._slot.pipeline
        if pipeline is None:
            return None
        enc = pipeline.encoder
        return {"backend": enc.backend, "device": enc.device, "providers": list(getattr(enc, "providers", ()))}

    def _endpoint(self, name: str) -> str:
        if name not in self._endpoints:
            raise ServiceError(f"the {name} socket is not bound yet; call start() first")
        return self._endpoints[name]

    # ------------------------------------------------------------------ threads
    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        return threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            name = threading.current_thread().name
            if name == "atomstream-load":  # a refused artifact: its message says it all
                log.error("cannot load the model: %s", exc)
            elif isinstance(exc, SocketError | SecurityError):  # a busy port, a bad key: one line says it all
                log.error("%s", exc)
            else:
                log.exception("service thread %s failed", name)
            self._fail(exc)
        finally:
            self._wake.wake()  # the I/O thread's drain waits for the worker to end: tell it now, not at a heartbeat

    def _fail(self, exc: BaseException) -> None:
        with self._failure_lock:
            if self._failure is None:
                self._failure = exc
        self._stop_requested.set()
        self._queue.close()
        self._slot.close()  # wait_ready and a worker waiting for its first model return now
        self._wake.wake()

    def _on_take(self) -> None:
        """The worker took a frame: there may be room in the queue again (``block`` policy) — tell the poller."""
        self.metrics.queue_depth.set(len(self._queue))
        self._wake.wake()

    def _post(self, result: FrameResult) -> None:
        self._outbox.put(result)
        self._wake.wake()

    def _io_main(self) -> None:
        sockets = None
        try:
            sockets = open_sockets(self.cfg)
            self._endpoints.update(sockets.endpoints)
            self._bound.set()
            assert self._worker is not None  # start() made it before starting this thread
            IOLoop(
                IOContext(
                    cfg=self.cfg,
                    sockets=sockets,
                    metrics=self.metrics,
                    ledger=self._ledger,
                    frames=self._queue,
                    outbox=self._outbox,
                    slot=self._slot,
                    models=self._models,
                    batcher=self._batcher,
                    worker=self._worker,
                    wake=self._wake,
                    stop_requested=self._stop_requested,
                    started=self._t0,
                )
            ).run()
        finally:
            self._bound.set()
            self._queue.close()
            self._slot.close()
            if sockets is not None:
                sockets.close()  # each with its own linger: the publishing sockets flush the tail to subscribers
