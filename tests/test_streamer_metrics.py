"""Metric names of DESIGN.md, a registry per service, and the HTTP endpoint's probes — scraped over real HTTP."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from artifact_factory import make_artifact

from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.service.metrics import MetricsServer, ServiceMetrics
from streamer.wire.protocol import ModelRef

DESIGN_NAMES = [
    "atomstream_frames_received_total",
    "atomstream_frames_published_total",
    'atomstream_frames_rejected_total{reason="bad_header"}',
    'atomstream_frames_dropped_total{reason="overloaded"}',
    "atomstream_patches_encoded_total",
    "atomstream_batch_size_bucket",
    'atomstream_stage_seconds_bucket{le="0.0001",stage="decode"}',
    "atomstream_end_to_end_seconds_count",
    "atomstream_queue_depth",
    "atomstream_model_info{",
]


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_every_design_metric_is_exposed_and_counts_are_per_service() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.set_model(ModelRef(name="m", version="1", sha256="ab" * 32), backend="onnx", device="cpu")
    a.frames_received.inc(3)
    text = a.render().decode()
    missing = [name for name in DESIGN_NAMES if name not in text]
    assert not missing, missing
    for stage in ("decode", "tile", "fft", "encode", "assemble", "publish"):
        assert f'stage="{stage}"' in text
    assert "atomstream_frames_received_total 3.0" in text
    assert "atomstream_frames_received_total 0.0" in b.render().decode()  # its own registry


def test_model_info_names_only_the_model_serving_now() -> None:
    m = ServiceMetrics()
    m.set_model(ModelRef(name="old", version="1", sha256="0" * 64), backend="onnx", device="cpu")
    m.set_model(ModelRef(name="new", version="2", sha256="1" * 64), backend="torchscript", device="cuda")
    lines = [line for line in m.render().decode().splitlines() if line.startswith("atomstream_model_info{")]
    assert lines == [
        f'atomstream_model_info{{backend="torchscript",device="cuda",name="new",sha256="{"1" * 64}",version="2"}} 1.0'
    ]


def test_probes_follow_the_service_state_and_unknown_paths_are_404() -> None:
    ready = threading.Event()
    server = MetricsServer(ServiceMetrics(), host="127.0.0.1", port=0, healthy=lambda: True, ready=ready.is_set)
    server.start()
    try:
        assert server.port > 0
        status, ctype, body = _get(server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain") and "atomstream_queue_depth" in body
        assert _get(server.url + "/healthz")[0] == 200
        assert _get(server.url + "/readyz")[:1] == (503,)
        ready.set()
        assert _get(server.url + "/readyz")[0] == 200
        assert _get(server.url + "/nope")[0] == 404
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/healthz", timeout=5)


def test_a_running_service_is_healthy_ready_and_reports_its_model(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path, seed=5, name="probe")
    cfg = ServiceConfig(
        artifact=artifact,
        device="cpu",
        ingest="tcp://127.0.0.1:0",
        publish="tcp://127.0.0.1:0",
        control="tcp://127.0.0.1:0",
        metrics_port=0,
    )
    with Service(cfg) as svc:
        svc.wait_ready(30)
        url = svc.metrics_url
        assert url is not None
        assert _get(url + "/healthz")[0] == 200 and _get(url + "/readyz")[0] == 200
        body = _get(url + "/metrics")[2]
        assert 'name="probe"' in body and "atomstream_queue_depth 0.0" in body
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=5)
