"""Issue 13, attacked as an outsider would: no single message, client or file takes the service down or stalls others.

Every case of the issue is replayed here against a real service over loopback, with small limits configured so each
attack is "just over the limit" rather than gigabytes (``benchmarks/attack.py`` replays them at full size against the
defaults and measures a victim producer's latency). Each test checks two things: the attack is refused the way the
issue asks (an answer, a count, a log line that does not flood), and everybody else is served meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from pydantic import ValidationError
from slow_encoder import SlowEncoder
from zmq_helpers import (
    Sockets,
    collect,
    control,
    handshake_succeeds,
    metric_value,
    push_frame,
    service_config,
    slow_subscriber,
    subscribe,
)

from atomstream.cli import main
from streamer.maps.encoder import Encoder, load
from streamer.maps.manifest import ArtifactError, sha256_file
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service, ServiceError
from streamer.service.frame_queue import FrameQueue, QueuedFrame
from streamer.wire.client import Controller, Subscriber
from streamer.wire.protocol import ScanEnd, ScanStart, encode
from streamer.wire.security import ClientCurve, CurveConfig, generate_keys

T = 20.0
FRAME = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("attacked"), seed=5)


@pytest.fixture(scope="module")
def encoder(artifact: Path) -> Encoder:
    return load(artifact, backend="onnx", device="cpu", batch_sizes=(1,))


def _config(**fields: Any) -> ServiceConfig:
    return service_config(**{"max_wait_ms": 0.0, **fields})


def _events(sub: zmq.Socket[bytes], n: int) -> list[Any]:
    """The next ``n`` maps or errors (defects and summaries skipped)."""
    got = collect(sub, lambda g: sum(m.kind in ("maps", "error") for m, _ in g) >= n, timeout_s=T)
    return [m for m, _ in got if m.kind in ("maps", "error")]


@contextlib.contextmanager
def _serving(cfg: ServiceConfig, encoder: Encoder | None, zs: Sockets) -> Iterator[tuple[Service, Any, Any, Any]]:
    """A running service with a subscriber, a producer and a control client connected."""
    with Service(cfg, encoder=encoder) as svc:
        svc.wait_ready(T)
        sub = subscribe(zs, svc.publish_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        yield svc, sub, push, req


def _victim_gets_maps(sub: zmq.Socket[bytes], push: zmq.Socket[bytes], frame_id: int) -> None:
    push_frame(push, "victim", frame_id, FRAME)
    (msg,) = _events(sub, 1)
    assert (msg.kind, msg.scan_id, msg.frame_id) == ("maps", "victim", frame_id), msg


def _metric(svc: Service, name: str) -> float:
    return metric_value(svc.metrics.render().decode(), name)


# ------------------------------------------------------------------------------------ 1. one message kills the process


def test_one_message_cannot_end_ingest_or_control(encoder: Encoder, zs: Sockets) -> None:
    """>4,300 digits anywhere, a shape of two 3,000-digit integers, meta ~984 deep: each ended the I/O thread."""
    header = json.dumps({"v": 1, "kind": "frame", "scan_id": "t", "frame_id": 7, "dtype": "float32",
                         "shape": [20, 20]})  # fmt: skip
    killers = [
        header.replace('"frame_id": 7', '"frame_id": ' + "9" * 5000),
        header.replace("[20, 20]", "[" + "9" * 3000 + ", " + "9" * 3000 + "]"),
        header.replace('"shape"', '"meta": ' + '{"a": ' * 984 + "1" + "}" * 984 + ', "shape"'),
        header.replace('"frame_id": 7', '"frame_id": 7, "t_acq_ns": ' + "1" * 4301),
    ]
    with _serving(_config(), encoder, zs) as (svc, sub, push, req):
        for text in killers:
            push.send_multipart([text.encode(), b"\0" * 1600])
            (msg,) = _events(sub, 1)
            assert (msg.kind, msg.reason) == ("error", "bad_header"), msg
        for raw in (
            b'{"cmd": "set", "defect_threshold": ' + b"9" * 5000 + b"}",
            b'{"cmd": "status", "x": ' + b"[" * 984 + b"]" * 984 + b"}",
            b'{"cmd": "reload", "artifact": "' + b"a" * 5000 + b'"}',
            b"[" * 60_000,
        ):
            req.send(raw)
            reply = json.loads(req.recv())
            assert reply["ok"] is False and reply["detail"]
        _victim_gets_maps(sub, push, 0)
        assert control(req, {"cmd": "status"})["frames_rejected"] == len(killers)
        assert _metric(svc, "atomstream_internal_errors_total") == 0  # refused by the decoder, not by the guard
        svc.check()


def test_an_exception_inside_the_loop_is_answered_counted_and_survived(
    encoder: Encoder, zs: Sockets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard: whatever escapes the handling of one message (here: the ledger failing once) becomes that message's
    ``internal`` error, a count and a log line; the next message is served."""
    with _serving(_config(), encoder, zs) as (svc, sub, push, req):
        ledger = svc._ledger
        real_admit = ledger.admit

        def fail_once(scan_id: str) -> None:
            monkeypatch.setattr(ledger, "admit", real_admit)
            raise RuntimeError("injected")

        monkeypatch.setattr(ledger, "admit", fail_once)
        push_frame(push, "victim", 0, FRAME)
        (msg,) = _events(sub, 1)
        assert (msg.kind, msg.reason) == ("error", "internal")
        _victim_gets_maps(sub, push, 1)
        assert _metric(svc, "atomstream_internal_errors_total") == 1
        status = control(req, {"cmd": "status"})
        assert status["frames_received"] == 2 and status["frames_dropped"] == 1 and status["frames_published"] == 1
        svc.check()


# ------------------------------------------------------------------------------------ 2. one client stalls everyone


def test_an_oversized_control_request_is_dropped_at_the_socket_while_others_are_served(
    encoder: Encoder, zs: Sockets
) -> None:
    """A 200 MB request froze ingest for 11 s; over ``max_control_bytes`` libzmq now drops it before holding it."""
    with _serving(_config(max_control_bytes=4096), encoder, zs) as (svc, sub, push, req):
        attacker = zs.socket(zmq.REQ)
        attacker.connect(svc.control_endpoint)
        attacker.send(b'{"cmd": "status", "pad": "' + b"x" * (1 << 20) + b'"}')
        _victim_gets_maps(sub, push, 0)
        assert control(req, {"cmd": "status"})["ok"]
        assert attacker.poll(200) == 0  # never answered: it never arrived
        svc.check()


def test_an_oversized_frame_is_dropped_at_the_socket_and_never_counted(encoder: Encoder, zs: Sockets) -> None:
    """A 1 GB message was held whole before its rejection; one just over ``max_frame_bytes`` is now never read."""
    with _serving(_config(max_frame_bytes=64 * 1024), encoder, zs) as (svc, sub, push, req):
        attacker = zs.socket(zmq.PUSH)
        attacker.connect(svc.ingest_endpoint)
        big = np.zeros((129, 128), np.float32)  # 66,048 bytes: just over the limit
        for k in range(5):
            push_frame(attacker, "big", k, big)
        for k in range(3):
            _victim_gets_maps(sub, push, k)
        assert control(req, {"cmd": "status"})["frames_received"] == 3
        svc.check()


def _queued(nbytes: int, frame_id: int) -> QueuedFrame:
    return QueuedFrame("s", frame_id, np.zeros(nbytes, np.uint8), None, 0, 0.0)


def test_the_queue_is_bounded_in_bytes_so_big_frames_cannot_crowd_out_small_ones() -> None:
    """Twelve 256 MB frames of one client sat ahead of a 20 fps victim's frames: the byte bound caps that backlog."""
    q = FrameQueue(100, "block", max_bytes=1000)
    q.put(_queued(2000, 0))  # larger than the bound on its own: an empty queue still takes it
    assert q.full() and q.nbytes == 2000
    assert q.take(None) is not None and not q.full()
    for k in range(3):
        q.put(_queued(400, k))
    assert q.full() and len(q) == 3  # 1,200 bytes: full by bytes, far below 100 frames
    dropping = FrameQueue(100, "drop_oldest", max_bytes=1000)
    for k in range(2):
        dropping.put(_queued(400, k))
    evicted = dropping.put(_queued(400, 2))
    assert [f.frame_id for f in evicted] == [0] and dropping.nbytes == 800


def test_a_reload_that_takes_too_long_times_out_while_frames_flow(artifact: Path, zs: Sockets, tmp_path: Path) -> None:
    """A reload of a 20 GB file held the control socket for 33 s. Here a 1 GiB (sparse) model file takes the loader
    a while to hash: the reload is answered at ``reload_timeout_s``, a second one is refused while the first still
    runs, and frames get their maps throughout."""
    slow = Path(shutil.copytree(artifact, tmp_path / "slow"))
    raw = json.loads((slow / "manifest.json").read_text())
    raw["files"]["encoder.ts"]["size"] = 1 << 30
    (slow / "manifest.json").write_text(json.dumps(raw))
    with open(slow / "encoder.ts", "wb") as fh:
        fh.truncate(1 << 30)
    cfg = _config(artifact=artifact, artifact_roots=[tmp_path], reload_timeout_s=0.2)
    with _serving(cfg, None, zs) as (svc, sub, push, req):
        req.send(json.dumps({"cmd": "reload", "artifact": str(slow)}).encode())
        _victim_gets_maps(sub, push, 0)  # served while the reload runs
        reply = json.loads(req.recv())
        assert reply["ok"] is False and "did not finish within" in reply["detail"], reply
        again = control(req, {"cmd": "reload", "artifact": str(slow)})
        assert again["ok"] is False and "still running" in again["detail"], again
        _victim_gets_maps(sub, push, 1)
        assert control(req, {"cmd": "status"})["model"]["sha256"] == sha256_file(artifact / "manifest.json")
        svc.check()


def test_reload_is_refused_for_oversized_artifacts_and_paths_outside_the_roots(
    artifact: Path, encoder: Encoder, zs: Sockets, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(artifact, tmp_path / "roots" / "copy"))
    cfg = _config(artifact_roots=[tmp_path / "roots"], max_artifact_bytes=1000)
    with _serving(cfg, encoder, zs) as (svc, sub, push, req):
        big = control(req, {"cmd": "reload", "artifact": str(copy)})
        assert big["ok"] is False and "over the limit of 1000" in big["detail"]
        outside = [control(req, {"cmd": "reload", "artifact": p})["detail"] for p in (str(artifact), "/nope/at/all")]
        # the same words whether the path exists or not: the control socket is no probe of the filesystem
        assert outside[0].replace(str(artifact), "PATH") == outside[1].replace("/nope/at/all", "PATH")
        assert "artifact_roots" in outside[0]
        escape = control(req, {"cmd": "reload", "artifact": str(tmp_path / "roots" / ".." / "roots" / ".." / "x")})
        assert escape["ok"] is False and "not under" in escape["detail"]
        _victim_gets_maps(sub, push, 0)
        refused = svc.metrics.render().decode()
        assert 'atomstream_control_refused_total{cmd="reload"} 4.0' in refused


def test_a_reliable_subscriber_that_never_reads_cannot_freeze_ingest(encoder: Encoder, zs: Sockets) -> None:
    """One ``publish_reliable`` subscriber that never read froze ingest for good; now it may hold ingest for
    ``reliable_timeout_s``, then its messages are dropped (counted) and every frame still gets its maps."""
    n = 150
    frame = np.random.default_rng(3).random((256, 256)).astype(np.float32)
    cfg = _config(publish_reliable="tcp://127.0.0.1:0", send_hwm=1, reliable_timeout_s=0.2)
    with Service(cfg, encoder=encoder) as svc:
        svc.wait_ready(T)
        stuck = slow_subscriber(zs, svc.publish_reliable_endpoint or "")
        assert stuck.poll(T * 1000)  # connected (a heartbeat arrived); it never reads again
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        for k in range(n):
            push_frame(push, "r", k, frame)
        deadline = time.monotonic() + T
        while (status := control(req, {"cmd": "status"}))["frames_published"] < n:
            assert time.monotonic() < deadline, f"ingest froze at {status['frames_published']} of {n} frames"
        assert status["frames_received"] == n
        assert _metric(svc, "atomstream_reliable_dropped_total") > 0, "the stuck subscriber never held ingest"


# ------------------------------------------------------------------------------------ 3. the scan ledger


def test_the_ledger_refuses_long_ids_and_extra_scans_and_never_forgets_a_live_one(
    encoder: Encoder, zs: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    """10,000 scan_start with 60 kB ids pinned 590 MB silently; 10,001 tiny ones evicted a live scan, whose summary
    then said 50 of 100 frames. Now each refusal is an ``error``, counted, logged without flooding."""
    cfg = _config(max_open_scans=4, max_scan_id_chars=32)
    with caplog.at_level(logging.WARNING, "atomstream.service"), _serving(cfg, encoder, zs) as (_, sub, push, req):
        push.send_multipart(encode(ScanStart(scan_id="live")))
        for k in range(2):
            push_frame(push, "live", k, FRAME)
        for k in range(20):
            push.send_multipart(encode(ScanStart(scan_id=f"flood-{k}")))
        push.send_multipart(encode(ScanStart(scan_id="x" * 60_000)))
        for k in range(2, 4):
            push_frame(push, "live", k, FRAME)
        push.send_multipart(encode(ScanEnd(scan_id="live", n_frames=4)))
        got = collect(sub, lambda g: any(m.kind == "scan_summary" for m, _ in g), timeout_s=T)
        errors = [m for m, _ in got if m.kind == "error"]
        summary = next(m for m, _ in got if m.kind == "scan_summary")
        status = control(req, {"cmd": "status"})
    assert sorted(e.reason for e in errors) == ["bad_header"] + ["overloaded"] * 17  # 3 flood scans fit beside live
    assert all(e.scan_id is None or len(e.scan_id) <= 64 for e in errors)
    assert (summary.scan_id, summary.frames_received, summary.frames_published) == ("live", 4, 4)
    assert status["frames_received"] == 4 + 18 and status["frames_published"] == 4
    assert status["frames_rejected"] + status["frames_dropped"] == 18
    assert sum("overloaded" in r.getMessage() for r in caplog.records) <= 2  # rate-limited, not 17 lines


# ------------------------------------------------------------------------------------ 4. the manifest


def test_the_model_identity_covers_the_manifest_and_failed_parity_is_refused(
    artifact: Path, zs: Sockets, tmp_path: Path
) -> None:
    """Edited class names, stride or defect classes were served under the same ``model.sha256``; ``parity.passed:
    false`` was served at all."""
    edited = Path(shutil.copytree(artifact, tmp_path / "edited"))
    raw = json.loads((edited / "manifest.json").read_text())
    raw["class_names"] = ["renamed", *raw["class_names"][1:]]
    (edited / "manifest.json").write_text(json.dumps(raw))
    failed = Path(shutil.copytree(artifact, tmp_path / "failed"))
    raw = json.loads((failed / "manifest.json").read_text())
    raw["parity"]["backends"][0]["passed"] = False
    (failed / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="parity"):
        load(failed, device="cpu")

    cfg = _config(artifact=artifact, artifact_roots=[tmp_path])
    with _serving(cfg, None, zs) as (svc, sub, push, req):
        before = control(req, {"cmd": "status"})["model"]["sha256"]
        refused = control(req, {"cmd": "reload", "artifact": str(failed)})
        assert refused["ok"] is False and "parity" in refused["detail"]
        reply = control(req, {"cmd": "reload", "artifact": str(edited)})
        assert reply["ok"], reply
        push_frame(push, "after", 0, FRAME)
        (maps,) = _events(sub, 1)
        info = svc.metrics.render().decode()
    assert before == sha256_file(artifact / "manifest.json")
    assert maps.model.sha256 == reply["model"]["sha256"] == sha256_file(edited / "manifest.json") != before
    assert maps.class_names[0] == "renamed" and f'sha256="{maps.model.sha256}"' in info


# ------------------------------------------------------------------------------------ 5. roles and exposure


def _handshake_ok(zs: Sockets, kind: int, endpoint: str, curve: ClientCurve) -> bool:
    sock = zs.socket(kind)
    curve.apply(sock)
    return handshake_succeeds(sock, endpoint, timeout_s=T)


def test_each_role_has_its_own_allow_list(encoder: Encoder, zs: Sockets, tmp_path: Path) -> None:
    """A viewer's key could inject frames, ``set`` and ``reload``: now each key opens the sockets of its roles only."""
    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    clients: dict[str, ClientCurve] = {}
    for role in ("producers", "viewers", "operators"):
        public, secret = generate_keys(tmp_path / "clients", role)
        (tmp_path / role).mkdir()
        shutil.copy(public, tmp_path / role / public.name)
        clients[role] = ClientCurve(client_secret_file=secret, server_public_file=server_public)
    curve = CurveConfig(server_secret_file=server_secret, producers_dir=tmp_path / "producers",
                        viewers_dir=tmp_path / "viewers", operators_dir=tmp_path / "operators")  # fmt: skip
    with Service(_config(curve=curve, metrics_port=None), encoder=encoder) as svc:
        svc.wait_ready(T)
        sockets_of = {"producers": (zmq.PUSH, svc.ingest_endpoint), "viewers": (zmq.SUB, svc.publish_endpoint),
                      "operators": (zmq.REQ, svc.control_endpoint)}  # fmt: skip
        allowed = {
            (key, role): _handshake_ok(zs, kind, endpoint, clients[key])
            for key in clients
            for role, (kind, endpoint) in sockets_of.items()
        }
        with Controller(svc.control_endpoint, curve=clients["operators"], timeout_ms=int(T * 1000)) as ctl:
            assert ctl.status().ok
    assert allowed == {(key, role): key == role for key in clients for role in sockets_of}


def test_readable_secret_keys_and_open_binds_without_curve_are_refused(
    encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, server_secret = generate_keys(tmp_path / "server", "server")
    (tmp_path / "authorized").mkdir()
    server_secret.chmod(0o644)
    curve = CurveConfig(server_secret_file=server_secret, authorized_keys_dir=tmp_path / "authorized")
    with pytest.raises(ServiceError, match="chmod 600"):
        Service(_config(curve=curve, metrics_port=None), encoder=encoder).start()
    with pytest.raises(ValidationError, match="without CURVE"):
        ServiceConfig(ingest="tcp://0.0.0.0:5555")
    assert ServiceConfig(ingest="tcp://0.0.0.0:5555", insecure=True).exposed_endpoints == ["tcp://0.0.0.0:5555"]
    assert ServiceConfig(ingest="tcp://[::1]:5555", control="ipc:///tmp/x").exposed_endpoints == []
    assert main(["serve", "--artifact", str(tmp_path), "--control", "tcp://*:5557"]) == 2
    err = capsys.readouterr().err
    assert "tcp://*:5557" in err and "--insecure" in err and "Traceback" not in err


def test_a_busy_port_is_one_clear_line_not_a_traceback(
    encoder: Encoder, artifact: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with Service(_config(metrics_port=None), encoder=encoder) as first:
        taken = first.ingest_endpoint
        code = main(["serve", "--artifact", str(artifact), "--ingest", taken, "--publish", "tcp://127.0.0.1:0",
                     "--control", "tcp://127.0.0.1:0", "--metrics-port", "none"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and taken in err and "another process" in err
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


# ------------------------------------------------------------------------------------ 6. shutdown and lost tails


def test_stop_answers_every_message_the_ingest_socket_already_holds(encoder: Encoder, zs: Sockets) -> None:
    """SIGTERM lost 219 of 3,000 frames that sat in the socket. The encoder is slow and the queue tiny, so most
    frames are still in ZeroMQ's and the kernel's buffers when ``stop`` comes: each must get maps or an error."""
    n = 60
    cfg = _config(queue_size=2, recv_hwm=2, max_batch_patches=16, linger_ms=5000)
    svc = Service(cfg, encoder=SlowEncoder(encoder, 0.02)).start()  # type: ignore[arg-type]
    try:
        svc.wait_ready(T)
        with Subscriber(svc.publish_endpoint, topics=("maps", "error"), rcvhwm=0) as sub:
            sub.wait_connected(T)
            push = zs.socket(zmq.PUSH)
            push.connect(svc.ingest_endpoint)
            for k in range(n):
                push_frame(push, "term", k, FRAME)
            req = zs.socket(zmq.REQ)
            req.connect(svc.control_endpoint)
            while control(req, {"cmd": "status"})["frames_received"] < 1:
                pass
            stopper = threading.Thread(target=svc.stop)
            stopper.start()
            answered = [sub.recv(T) for _ in range(n)]
            stopper.join(T)
    finally:
        svc.stop()
    assert sorted(g.msg.frame_id for g in answered) == list(range(n))
    counts = svc.counts
    assert counts["frames_received"] == n
    assert counts["frames_published"] + counts["frames_dropped"] + counts["frames_rejected"] == n


def test_the_heartbeat_repeats_the_last_scan_summary_until_the_next_scan(encoder: Encoder, zs: Sockets) -> None:
    """A slow subscriber lost the tail of a scan with its ``scan_summary``; the heartbeat now carries the summary."""
    with _serving(_config(), encoder, zs) as (svc, _, push, req):
        status_only = zs.socket(zmq.SUB)
        status_only.setsockopt(zmq.SUBSCRIBE, b"status")
        status_only.connect(svc.publish_endpoint)
        push.send_multipart(encode(ScanStart(scan_id="a")))
        for k in range(2):
            push_frame(push, "a", k, FRAME)
        push.send_multipart(encode(ScanEnd(scan_id="a", n_frames=2)))

        def next_status() -> Any:
            from zmq_helpers import recv_published

            return recv_published(status_only)[0]

        status = next_status()
        while status.scan_summary is None:
            status = next_status()
        assert (status.scan_summary.scan_id, status.scan_summary.frames_published) == ("a", 2)
        assert next_status().scan_summary == status.scan_summary  # repeated, beat after beat
        push.send_multipart(encode(ScanStart(scan_id="b")))
        while status.scan_summary is not None:
            status = next_status()
        assert control(req, {"cmd": "status"})["scan_summary"] is None
