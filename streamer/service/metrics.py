"""The service's Prometheus metrics and its small HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

Each ``ServiceMetrics`` owns its own ``CollectorRegistry`` (never the process-global one), so several services — or
several tests — in one process do not share or collide on counters. Names follow DESIGN.md with the ``atomstream_``
prefix. Label values that are known in advance (rejection reasons, stages) are created at zero, so a dashboard shows
"0 rejected" rather than no series at all.

``/healthz`` answers 200 while the service's loop runs (a liveness probe: restart me if not), ``/readyz`` 200 once a
model is loaded (a readiness probe: send me frames), 503 otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streamer.wire.protocol import REASONS, ModelRef

__all__ = ["DROP_REASONS", "REJECT_REASONS", "STAGES", "MetricsServer", "ServiceMetrics"]

STAGES: tuple[str, ...] = ("decode", "tile", "fft", "encode", "assemble", "publish")
#: A frame is *rejected* when the input was bad and *dropped* when the service could not process a good one.
DROP_REASONS: tuple[str, ...] = ("overloaded", "internal")
REJECT_REASONS: tuple[str, ...] = tuple(r for r in REASONS if r not in DROP_REASONS)

_STAGE_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SHUTDOWN_POLL_S = 0.05  # how soon stop() takes effect (the library default, 0.5 s, slows every shutdown)
_BATCH_BUCKETS = tuple(float(2**k) for k in range(14))


class ServiceMetrics:
    """Every metric of DESIGN.md, registered in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames_received = Counter(
            "atomstream_frames_received", "Frames received on ingest (valid or not)", registry=r
        )
        self.frames_published = Counter("atomstream_frames_published", "Frames whose maps were published", registry=r)
        self.frames_rejected = Counter(
            "atomstream_frames_rejected", "Frames refused as bad input, by reason", ["reason"], registry=r
        )
        self.frames_dropped = Counter(
            "atomstream_frames_dropped", "Good frames not processed (overload, internal error)", ["reason"], registry=r
        )
        self.patches_encoded = Counter("atomstream_patches_encoded", "Patches through the encoder", registry=r)
        self.batch_size = Histogram(
            "atomstream_batch_size", "Patches per encoder call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "atomstream_stage_seconds", "Time per stage per frame (encode: per call)", ["stage"],
            buckets=_STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.end_to_end_seconds = Histogram(
            "atomstream_end_to_end_seconds", "Receive to publish, per frame", buckets=_E2E_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("atomstream_queue_depth", "Frames accepted and waiting for the encoder", registry=r)
        self.queue_bytes = Gauge("atomstream_queue_bytes", "Bytes of frames waiting for the encoder", registry=r)
        self.internal_errors = Counter(
            "atomstream_internal_errors",
            "Exceptions caught by the I/O loop's guard (a bug: the message was answered, the loop went on)",
            registry=r,
        )
        self.reliable_dropped = Counter(
            "atomstream_reliable_dropped",
            "Messages the publish_reliable socket did not take because a subscriber held ingest too long",
            registry=r,
        )
        self.control_refused = Counter(
            "atomstream_control_refused", "Control requests answered ok=false, by command", ["cmd"], registry=r
        )
        self.model_info = Gauge(
            "atomstream_model_info", "The model serving now (value 1)",
            ["name", "version", "sha256", "backend", "device"], registry=r,
        )  # fmt: skip
        for reason in REJECT_REASONS:
            self.frames_rejected.labels(reason=reason)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason=reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def set_model(self, model: ModelRef, *, backend: str, device: str) -> None:
        """Exactly one ``model_info`` series: the model now serving."""
        self.model_info.clear()
        self.model_info.labels(
            name=model.name, version=model.version, sha256=model.sha256, backend=backend, device=device
        ).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: ServiceMetrics,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.server.healthy()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"loop not running\n")
        elif path == "/readyz":
            ok = self.server.ready()
            self._reply(200 if ok else 503, b"ready\n" if ok else b"no model loaded\n")
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood stderr; the service logs what matters."""


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: a free one), in a thread; stoppable."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        *,
        host: str,
        port: int,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        self._httpd = _Server((host, port), metrics, healthy, ready)
        self._thread = threading.Thread(target=self._serve, name="atomstream-metrics", daemon=True)

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _serve(self) -> None:
        self._httpd.serve_forever(poll_interval=_SHUTDOWN_POLL_S)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
