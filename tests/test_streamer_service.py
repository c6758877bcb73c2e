"""The live service over real loopback sockets: live equals offline, every frame accounted for, control, overload,
drain on stop and on SIGTERM. No sleeps: heartbeats, control ``status`` and encoder gates are the handshakes."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zmq
from artifact_factory import make_artifact
from pydantic import ValidationError
from zmq_helpers import (
    TIMEOUT_S,
    Sockets,
    collect,
    control,
    metric_value,
    push_frame,
    push_scan,
    service_config,
    subscribe,
    wait_until_received,
)

from atomstream.cli import main
from sim.lattice import LatticeConfig, synth_frame
from sim.replay import replay
from streamer.maps.encoder import Encoder, load
from streamer.maps.pipeline import FrameMaps, Pipeline
from streamer.service.config import ConfigError, ServiceConfig
from streamer.service.facade import Service, ServiceError
from streamer.wire.protocol import ScanEnd, encode, frame_message
from streamer.wire.security import CurveConfig, generate_keys, secure_client_socket

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("served"), translation=True, seed=11)


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("reloaded"), translation=True, seed=12, name="other", version="2")


@pytest.fixture(scope="module")
def encoder(artifact: Path) -> Encoder:
    return load(artifact, backend="onnx", device="cpu", batch_sizes=(1,))


def _config(**fields: Any) -> ServiceConfig:
    return service_config(**{"max_wait_ms": 1.0, **fields})


def _frame(shape: tuple[int, int], seed: int, dtype: str = "float32") -> np.ndarray:
    frame = synth_frame(LatticeConfig(shape=shape, lattice_constant=9.0, n_defects=3), seed=seed)[0]
    if np.dtype(dtype).kind in "iu":
        return np.round(frame / frame.max() * 250).astype(dtype)
    return frame.astype(dtype)


FRAMES = [
    _frame((40, 50), 0),
    _frame((33, 71), 1, "uint16"),
    _frame((64, 24), 2, "int16"),
    _frame((47, 47), 3, "float64"),
    _frame((16, 16), 4, "uint8"),
    _frame((90, 61), 5),
]


class GatedEncoder:
    """A real encoder whose calls wait for ``gate`` (a stalled GPU on demand) and raise while ``fail`` is set."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.backend, self.device, self.torch_device, self.sha256 = (
            inner.backend,
            inner.device,
            inner.torch_device,
            inner.sha256,
        )
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def __call__(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        self.entered.set()
        if not self.gate.wait(TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")
        if self.fail:
            raise RuntimeError("simulated CUDA error")
        return self.inner(patches)


def _assert_equal_maps(msg: Any, arrays: list[np.ndarray], offline: FrameMaps) -> None:
    assert [a.name for a in msg.arrays] == list(offline.arrays)
    assert msg.grid == list(offline.grid or []) and msg.layout == offline.layout
    for spec, live in zip(msg.arrays, arrays, strict=True):
        ref = offline.arrays[spec.name]
        assert live.shape == ref.shape and live.dtype == ref.dtype, spec.name
        np.testing.assert_allclose(live, ref, atol=ATOL, err_msg=spec.name)


def _scrape(url: str, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _by_kind(got: list[tuple[Any, list[np.ndarray]]], kind: str) -> list[tuple[Any, list[np.ndarray]]]:
    return [(m, a) for m, a in got if m.kind == kind]


def _summary_arrived(got: list[tuple[Any, list[np.ndarray]]]) -> bool:
    return any(m.kind == "scan_summary" for m, _ in got)


# ---------------------------------------------------------------------------------------------- live == offline


@pytest.mark.parametrize("frame_encoder", [False, True], ids=["cut", "frames-whole"])
def test_replayed_scan_gives_maps_equal_to_the_offline_pipeline(
    artifact: Path, encoder: Encoder, zs: Sockets, frame_encoder: bool
) -> None:
    """Cut: every frame's patches batched across frames. Frames whole: the frames of at least 20 patches (half a
    batch of 40) are read whole by the artifact's frame encoder, the others still cut and batched."""
    with Service(_config(artifact=artifact, max_batch_patches=40, frame_encoder=frame_encoder)) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        summary = replay(FRAMES, svc.ingest_endpoint, scan_id="live", progress=False)
        assert summary.frames == len(FRAMES)
        got = collect(sub, _summary_arrived)
        _, metrics = _scrape(svc.metrics_url or "")

    offline = Pipeline(encoder, max_batch_patches=40)
    whole = [offline.encodes_whole(offline.prepare(f)) for f in FRAMES]
    assert (any(whole) and not all(whole)) if frame_encoder else offline.frames_whole
    maps, defects = _by_kind(got, "maps"), _by_kind(got, "defects")
    assert [m.frame_id for m, _ in maps] == list(range(len(FRAMES)))
    assert [m.seq for m, _ in maps] == list(range(len(FRAMES)))  # per-topic sequence from 0
    assert [m.frame_id for m, _ in defects] == list(range(len(FRAMES)))
    assert [m.seq for m, _ in defects] == list(range(len(FRAMES)))
    patches = 0
    for (msg, arrays), (dmsg, _) in zip(maps, defects, strict=True):
        ref = offline.process(FRAMES[msg.frame_id])
        _assert_equal_maps(msg, arrays, ref)
        patches += math.prod(ref.grid or (0,))
        assert msg.scan_id == "live" and msg.model.sha256 == encoder.sha256 and msg.class_names == list(ref.class_names)
        assert msg.t_recv_ns <= msg.t_pub_ns and msg.t_acq_ns is not None
        assert len(dmsg.defects) == len(ref.defects)
        for live_d, ref_d in zip(dmsg.defects, ref.defects, strict=True):
            assert (live_d.class_, live_d.area) == (ref_d.class_, ref_d.area)
            assert (live_d.y, live_d.x, live_d.score) == pytest.approx((ref_d.y, ref_d.x, ref_d.score), abs=1e-4)

    (scan_summary, _), *_ = _by_kind(got, "scan_summary")
    assert scan_summary.scan_id == "live" and scan_summary.n_frames == len(FRAMES)
    assert (scan_summary.frames_received, scan_summary.frames_published) == (len(FRAMES), len(FRAMES))
    assert scan_summary.frames_rejected == scan_summary.frames_dropped == 0
    assert metric_value(metrics, "atomstream_frames_received_total") == len(FRAMES)
    assert metric_value(metrics, "atomstream_frames_published_total") == len(FRAMES)
    assert metric_value(metrics, "atomstream_patches_encoded_total") == patches
    if not frame_encoder:
        assert metric_value(metrics, "atomstream_batch_size_count") < len(FRAMES)  # batched across frames
    assert metric_value(metrics, "atomstream_end_to_end_seconds_count") == len(FRAMES)
    assert 'atomstream_model_info{backend="onnx",device="cpu",name="test-encoder"' in metrics


# ---------------------------------------------------------------------------------------------- bad input


def _bad_messages(good: np.ndarray) -> dict[str, tuple[list[bytes], str, int | None]]:
    """name -> (message, expected reason, frame id the error must name)."""
    header = frame_message("s", 2, good).model_dump(mode="json")
    nan = good.astype(np.float32).copy()
    nan[3, 4] = np.nan
    tiny = good[:8, :8].copy()
    return {
        "short_payload": ([json.dumps(header).encode(), good.tobytes()[:-4]], "shape_mismatch", 2),
        "nan": ([json.dumps(header).encode(), nan.tobytes()], "non_finite", 2),
        "bad_json": ([b'{"v": 1, "kind": "frame", "scan_id": "s", "fra'], "bad_header", None),
        "bool_dtype": ([json.dumps({**header, "dtype": "bool"}).encode(), good.tobytes()], "unsupported_dtype", 2),
        "too_small_for_patch": (list(encode(frame_message("s", 2, tiny), tiny)), "shape_mismatch", 2),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["short_payload", "nan", "bad_json", "bool_dtype", "too_small_for_patch"])
def test_a_malformed_frame_yields_one_error_and_every_other_frame_its_maps(
    artifact: Path, zs: Sockets, case: str
) -> None:
    good = [_frame((40, 40), k) for k in range(5)]
    bad, reason, frame_id = _bad_messages(good[2])[case]
    with Service(_config(artifact=artifact)) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        for k in range(5):
            if k == 2:
                push.send_multipart(bad)
            else:
                push_frame(push, "s", k, good[k])
        push.send_multipart(encode(ScanEnd(scan_id="s", n_frames=5)))
        got = collect(sub, _summary_arrived)
        _, metrics = _scrape(svc.metrics_url or "")
    errors = _by_kind(got, "error")
    assert len(errors) == 1
    err = errors[0][0]
    assert (err.reason, err.frame_id) == (reason, frame_id)
    assert err.scan_id == ("s" if frame_id is not None else None) and err.detail
    assert sorted(m.frame_id for m, _ in _by_kind(got, "maps")) == [0, 1, 3, 4]
    (summary, _), *_ = _by_kind(got, "scan_summary")
    named = frame_id is not None  # a header that is not JSON cannot say which scan it belonged to
    assert summary.frames_received == 4 + named and summary.frames_rejected == int(named)
    assert summary.frames_published == 4
    assert metric_value(metrics, "atomstream_frames_received_total") == 5
    assert metric_value(metrics, f'atomstream_frames_rejected_total{{reason="{reason}"}}') == 1


def test_an_encoder_exception_fails_its_batch_as_internal_and_the_service_goes_on(
    encoder: Encoder, zs: Sockets
) -> None:
    gated = GatedEncoder(encoder)
    with Service(_config(), encoder=gated) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        gated.fail = True
        push_frame(push, "s", 0, FRAMES[0])
        (err, _), *_ = collect(sub, lambda got: len(got) > 0)
        gated.fail = False
        push_frame(push, "s", 1, FRAMES[0])
        (maps, _), *_ = collect(sub, lambda got: len(got) > 0)
        svc.check()
    assert (err.kind, err.reason, err.frame_id) == ("error", "internal", 0)
    assert "simulated CUDA error" in err.detail
    assert (maps.kind, maps.frame_id) == ("maps", 1)


# ---------------------------------------------------------------------------------------------- control


def test_control_status_set_and_reload_without_losing_frames(
    artifact: Path, other_artifact: Path, encoder: Encoder, zs: Sockets
) -> None:
    new_encoder = load(other_artifact, device="cpu", batch_sizes=(1,))
    with Service(_config(artifact=artifact, defect_threshold=0.9)) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)

        status = control(req, {"cmd": "status"})
        assert status["ok"] and status["model"]["sha256"] == encoder.sha256
        assert (status["backend"], status["device"], status["defect_threshold"]) == ("onnx", "cpu", 0.9)

        reply = control(req, {"cmd": "set", "defect_classes": ["class1"], "defect_threshold": 0.95})
        assert reply["ok"] and reply["defect_classes"] == ["class1"] and reply["defect_threshold"] == 0.95
        refused = control(req, {"cmd": "set", "defect_classes": ["vacancy"]})
        assert not refused["ok"] and "vacancy" in refused["detail"]
        assert not control(req, {"cmd": "frobnicate"})["ok"]

        push_frame(push, "s", 0, FRAMES[0])
        (first, first_arrays), *_ = collect(sub, lambda got: len(_by_kind(got, "maps")) == 1)
        prob = first_arrays[[a.name for a in first.arrays].index("class_prob")]
        score = first_arrays[[a.name for a in first.arrays].index("defect_score")]
        np.testing.assert_allclose(score, prob[..., 1], atol=1e-6)  # the score is now the mass on class1

        failed = control(req, {"cmd": "reload", "artifact": str(other_artifact.parent / "missing")})
        assert not failed["ok"] and "missing" in failed["detail"]

        # frames before, during and after a reload: each one gets maps, made by the model it names
        for k in range(1, 6):
            push_frame(push, "s", k, FRAMES[k])
        req.send(json.dumps({"cmd": "reload", "artifact": str(other_artifact)}).encode())
        for k in range(6, 11):
            push_frame(push, "s", k, FRAMES[k % len(FRAMES)])
        reloaded = json.loads(req.recv())
        for k in range(11, 14):
            push_frame(push, "s", k, FRAMES[k % len(FRAMES)])
        got = collect(sub, lambda got: len(_by_kind(got, "maps")) == 13)
        after = control(req, {"cmd": "status"})
    assert reloaded["ok"] and reloaded["model"]["sha256"] == new_encoder.sha256
    assert after["model"]["name"] == "other" and after["defect_classes"] == ["class1"]
    assert not _by_kind(got, "error")
    offline = {
        encoder.sha256: Pipeline(encoder, defect_classes=["class1"], defect_threshold=0.95),
        new_encoder.sha256: Pipeline(new_encoder, defect_classes=["class1"], defect_threshold=0.95),
    }
    models = []
    for msg, arrays in _by_kind(got, "maps"):
        models.append(msg.model.name)
        _assert_equal_maps(msg, arrays, offline[msg.model.sha256].process(FRAMES[msg.frame_id % len(FRAMES)]))
    assert sorted(m.frame_id for m, _ in _by_kind(got, "maps")) == list(range(1, 14))
    assert models[-3:] == ["other"] * 3  # pushed after the reload answered
    assert models == sorted(models, key=lambda name: name == "other")  # old model, then the new one, never back


# ---------------------------------------------------------------------------------------------- overload


def test_drop_oldest_publishes_overloaded_errors_naming_the_dropped_frames(encoder: Encoder, zs: Sockets) -> None:
    gated = GatedEncoder(encoder)
    gated.gate.clear()
    frame = _frame((40, 40), 0)  # 16 patches: one frame per batch below
    cfg = _config(overload="drop_oldest", queue_size=1, max_batch_patches=16, max_wait_ms=0)
    with Service(cfg, encoder=gated) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        push_frame(push, "s", 0, frame)
        assert gated.entered.wait(TIMEOUT_S)  # frame 0 is inside the (stalled) encoder
        for k in range(1, 6):
            push_frame(push, "s", k, frame)
        status = wait_until_received(req, 6)
        gated.gate.set()
        push.send_multipart(encode(ScanEnd(scan_id="s", n_frames=6)))
        got = collect(sub, lambda got: bool(_by_kind(got, "scan_summary")))
        _, metrics = _scrape(svc.metrics_url or "")
    assert status["queue_depth"] == 1
    errors = _by_kind(got, "error")
    assert [(m.reason, m.scan_id, m.frame_id) for m, _ in errors] == [("overloaded", "s", k) for k in (1, 2, 3, 4)]
    assert "drop_oldest" in errors[0][0].detail
    assert [m.frame_id for m, _ in _by_kind(got, "maps")] == [0, 5]  # the oldest go, the newest is kept
    summary = _by_kind(got, "scan_summary")[0][0]
    assert (summary.frames_received, summary.frames_published, summary.frames_dropped) == (6, 2, 4)
    assert summary.frames_rejected == 0
    assert metric_value(metrics, "atomstream_frames_received_total") == 6
    assert metric_value(metrics, "atomstream_frames_published_total") == 2
    assert metric_value(metrics, 'atomstream_frames_dropped_total{reason="overloaded"}') == 4


def test_block_policy_pushes_back_on_the_producer_and_loses_nothing(encoder: Encoder, zs: Sockets) -> None:
    gated = GatedEncoder(encoder)
    gated.gate.clear()
    big = _frame((512, 512), 0)  # 1 MiB: a few fill the socket buffers quickly
    cfg = _config(queue_size=1, recv_hwm=1, max_batch_patches=4096)
    with Service(cfg, encoder=gated) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        push = zs.socket(zmq.PUSH, timeout_ms=300)
        push.setsockopt(zmq.SNDHWM, 1)
        push.connect(svc.ingest_endpoint)
        sent = 0
        with pytest.raises(zmq.Again):  # the producer blocks: the service stopped reading
            for k in range(200):
                push_frame(push, "s", k, big)
                sent += 1
        assert gated.entered.is_set() and sent < 200
        assert control(req, {"cmd": "status"})["queue_depth"] <= 1
        gated.gate.set()
        push.setsockopt(zmq.SNDTIMEO, -1)
        push.send_multipart(encode(ScanEnd(scan_id="s", n_frames=sent)))
        got = collect(sub, lambda got: bool(_by_kind(got, "scan_summary")))
        _, metrics = _scrape(svc.metrics_url or "")
    assert [m.frame_id for m, _ in _by_kind(got, "maps")] == list(range(sent))  # all maps, in order
    assert not _by_kind(got, "error")
    summary = _by_kind(got, "scan_summary")[0][0]
    assert (summary.frames_received, summary.frames_published, summary.frames_dropped) == (sent, sent, 0)
    assert metric_value(metrics, 'atomstream_frames_dropped_total{reason="overloaded"}') == 0


# ---------------------------------------------------------------------------------------------- shutdown


def test_stop_drains_and_publishes_every_frame_in_flight(encoder: Encoder, zs: Sockets) -> None:
    gated = GatedEncoder(encoder)
    gated.gate.clear()
    svc = Service(_config(queue_size=8), encoder=gated).start()
    try:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        push_scan(push, "s", FRAMES)
        wait_until_received(req, len(FRAMES))
        stopper = threading.Thread(target=svc.stop)
        stopper.start()
        stopper.join(0.2)
        assert stopper.is_alive()  # waiting for the stalled encoder, not dropping its frames
        gated.gate.set()
        stopper.join(TIMEOUT_S)
        assert not stopper.is_alive()
    finally:
        gated.gate.set()
        svc.stop()
    got = collect(sub, _summary_arrived, timeout_s=5)
    assert sorted(m.frame_id for m, _ in _by_kind(got, "maps")) == list(range(len(FRAMES)))
    assert not _by_kind(got, "error")
    assert _by_kind(got, "scan_summary")[0][0].frames_published == len(FRAMES)


def _read_json_line(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"atomstream serve printed nothing in {timeout_s} s")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"atomstream serve exited early: {proc.wait(5)}, {proc.stderr and proc.stderr.read()}")
    return json.loads(line)


def test_sigterm_finishes_in_flight_frames_and_exits_zero(artifact: Path, zs: Sockets) -> None:
    argv = [
        sys.executable, "-c", "import sys; from atomstream.cli import main; sys.exit(main())", "serve",
        "--artifact", str(artifact), "--device", "cpu", "--ingest", "tcp://127.0.0.1:0",
        "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--metrics-port", "none",
        "--status-interval-s", "0.05", "--log-level", "WARNING",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOMSTREAM_")}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = _read_json_line(proc, 60)
        assert ready["event"] == "ready" and ready["metrics"] is None
        sub = subscribe(zs, ready["publish"])
        req = zs.socket(zmq.REQ)
        req.connect(ready["control"])
        push = zs.socket(zmq.PUSH)
        push.connect(ready["ingest"])
        push_scan(push, "term", FRAMES[:4])
        wait_until_received(req, 4)
        proc.send_signal(signal.SIGTERM)
        got = collect(sub, _summary_arrived)
        assert proc.wait(TIMEOUT_S) == 0
        stopped = _read_json_line(proc, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert sorted(m.frame_id for m, _ in _by_kind(got, "maps")) == [0, 1, 2, 3]
    assert stopped == {
        "event": "stopped",
        "frames_received": 4,
        "frames_published": 4,
        "frames_rejected": 0,
        "frames_dropped": 0,
    }


# ---------------------------------------------------------------------------------------------- config, startup


def test_config_precedence_is_flags_then_environment_then_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("queue_size: 3\nmax_wait_ms: 7\nbackend: torchscript\ndefect_classes: [vacancy, 2]\n")
    monkeypatch.setenv("ATOMSTREAM_MAX_WAIT_MS", "9")
    monkeypatch.setenv("ATOMSTREAM_BACKEND", "onnx")
    cfg = ServiceConfig.load(config_file=yaml_file, overrides={"backend": "torchscript", "metrics_port": None})
    assert (cfg.queue_size, cfg.max_wait_ms, cfg.backend, cfg.metrics_port) == (3, 9.0, "torchscript", None)
    assert cfg.defect_classes == ["vacancy", 2]
    assert ServiceConfig.load().ingest == "tcp://127.0.0.1:5555"  # the YAML applied to that call only
    with pytest.raises(ValidationError, match="frozen"):
        cfg.queue_size = 5  # type: ignore[misc]

    yaml_file.write_text("queue_sise: 3\n")
    with pytest.raises(ConfigError, match="queue_sise"):
        ServiceConfig.load(config_file=yaml_file)
    yaml_file.write_text("queue_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ServiceConfig.load(config_file=yaml_file)
    with pytest.raises(ConfigError, match="does not exist"):
        ServiceConfig.load(config_file=tmp_path / "nope.yaml")


def test_intra_op_threads_reach_the_onnx_session(artifact: Path) -> None:
    with pytest.raises(ConfigError, match="intra_op_threads"):
        ServiceConfig.load(overrides={"intra_op_threads": 0})
    with Service(_config(artifact=artifact, intra_op_threads=1)) as svc:
        svc.wait_ready(30)
        pipeline = svc._slot.pipeline
        assert pipeline is not None and pipeline.encoder.intra_op_threads == 1


def test_a_port_in_use_is_refused_with_the_endpoint_named(encoder: Encoder) -> None:
    with Service(_config(metrics_port=None), encoder=encoder) as first:
        taken = first.publish_endpoint
        with pytest.raises(ServiceError, match=f"publish socket to '{taken}'"):
            Service(_config(publish=taken, metrics_port=None), encoder=encoder).start()
    with pytest.raises(ServiceError, match="no model"):
        Service(_config())


def test_a_bad_artifact_surfaces_on_wait_ready(tmp_path: Path) -> None:
    svc = Service(_config(artifact=tmp_path / "nothing-here", metrics_port=None)).start()
    with pytest.raises(ServiceError, match="nothing-here"):
        svc.wait_ready(TIMEOUT_S)
    with pytest.raises(ServiceError):
        svc.stop()


def test_with_curve_only_authorised_clients_get_in(encoder: Encoder, tmp_path: Path, zs: Sockets) -> None:
    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    _, viewer_secret = generate_keys(tmp_path / "authorized", "viewer")
    _, stranger_secret = generate_keys(tmp_path / "strangers", "stranger")
    viewer_secret.rename(tmp_path / "viewer.key_secret")  # only public keys stay in the allow-list directory
    curve = CurveConfig(server_secret_file=server_secret, authorized_keys_dir=tmp_path / "authorized")
    with Service(_config(curve=curve, metrics_port=None), encoder=encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        stranger = zs.socket(zmq.REQ, timeout_ms=300)
        secure_client_socket(stranger, client_secret_file=stranger_secret, server_public_file=server_public)
        stranger.connect(svc.control_endpoint)
        stranger.send(b'{"cmd": "status"}')  # queued: the handshake never completes
        with pytest.raises(zmq.Again):
            stranger.recv()
        viewer = zs.socket(zmq.REQ)
        secure_client_socket(
            viewer, client_secret_file=tmp_path / "viewer.key_secret", server_public_file=server_public
        )
        viewer.connect(svc.control_endpoint)
        assert control(viewer, {"cmd": "status"})["ok"]


def test_serve_refuses_a_missing_artifact_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-artifact"
    argv = ["serve", "--artifact", str(missing), "--ingest", "tcp://127.0.0.1:0", "--publish", "tcp://127.0.0.1:0"]
    argv += ["--control", "tcp://127.0.0.1:0", "--metrics-port", "none", "--log-level", "ERROR"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("atomstream serve: error:") and "no-such-artifact" in err and "does not exist" in err
    assert main(["serve", "--ingest", "tcp://127.0.0.1:0"]) == 2
    assert "no artifact" in capsys.readouterr().err
