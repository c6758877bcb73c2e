"""The subscriber library and control client over real loopback sockets: typed maps, gaps, restarts, timeouts,
and ``atomstream watch``. No sleeps: heartbeats prove a subscription is live; a probe loop stands in for them on
hand-driven publishers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from zmq_helpers import push_frame, sockets

from atomstream.cli import main
from sim.replay import Replayer
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.wire.client import ControlError, Controller, ControlTimeoutError, Gap, Subscriber
from streamer.wire.protocol import ArraySpec, Maps, ModelRef, Status, encode_published

T = 20.0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("client"), translation=True, seed=3)


@contextmanager
def serve(artifact: Path, **overrides: Any) -> Iterator[Service]:
    fields: dict[str, Any] = {
        "artifact": artifact,
        "ingest": "tcp://127.0.0.1:0",
        "publish": "tcp://127.0.0.1:0",
        "control": "tcp://127.0.0.1:0",
        "metrics_port": None,
        "status_interval_s": 0.05,
        "linger_ms": 0,
        **overrides,
    }
    with Service(ServiceConfig(**fields)) as service:
        service.wait_ready(T)
        yield service


def frames(n: int, shape: tuple[int, int] = (40, 56), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def until_summary(sub: Subscriber) -> list[Any]:
    got = []
    while True:
        r = sub.recv(T)
        got.append(r)
        if r.topic == "scan_summary":
            return got


def test_subscriber_yields_typed_maps_with_arrays_by_name(artifact: Path) -> None:
    with serve(artifact) as service, Subscriber(service.publish_endpoint, ("maps", "defects", "scan_summary")) as sub:
        sub.wait_connected(T)
        with Replayer(service.ingest_endpoint, progress=False, scan_id="s") as r:
            r.send_scan(frames(3))
        got = until_summary(sub)
    maps = [g for g in got if g.topic == "maps"]
    assert [m.msg.frame_id for m in maps] == [0, 1, 2]
    assert {g.topic for g in got} == {"maps", "defects", "scan_summary"}  # status not asked for, not yielded
    m = maps[0]
    assert isinstance(m.msg, Maps)
    assert list(m.arrays) == [a.name for a in m.msg.arrays] == ["class", "class_prob", "z", "angle", "shift",
                                                                 "defect_score"]  # fmt: skip
    gh, gw = m.msg.grid
    assert m.arrays["class"].shape == (gh, gw) and m.arrays["class"].dtype == np.uint8
    assert m.arrays["class_prob"].shape == (gh, gw, m.msg.n_classes)
    np.testing.assert_allclose(m.arrays["class_prob"].sum(-1), 1.0, atol=1e-5)
    assert sub.stats.n_gaps == 0 and sub.stats.n_restarts == 0 and sub.stats.received["maps"] == 3


def _maps(seq: int) -> Maps:
    return Maps(
        scan_id="s", frame_id=seq, seq=seq, layout="grid", grid=[1, 1], patch=[4, 4], stride=[4, 4], origin=[0, 0],
        n_classes=2, latent_dim=0, class_names=["a", "b"], model=ModelRef(name="m", version="1", sha256="0"),
        t_recv_ns=0, t_pub_ns=0, arrays=[ArraySpec(name="class", dtype="uint8", shape=[1, 1])],
    )  # fmt: skip


def _status(seq: int, uptime: float) -> Status:
    return Status(
        seq=seq, uptime_s=uptime, frames_received=0, frames_published=0, frames_rejected=0, frames_dropped=0,
        queue_depth=0, model=None, backend="onnx", device="cpu",
    )  # fmt: skip


def test_gaps_are_recorded_and_a_restart_is_not_a_gap() -> None:
    gaps: list[Gap] = []
    with sockets() as zs:
        pub = zs.socket(zmq.PUB)
        pub.bind("tcp://127.0.0.1:*")
        with Subscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT), on_gap=gaps.append) as sub:
            k = 0
            while True:  # probe: heartbeats with consecutive seq until one arrives (slow joiner)
                pub.send_multipart(encode_published(_status(k, 100.0 + k)))
                k += 1
                try:
                    if sub.recv(0.05).topic == "status":
                        break
                except TimeoutError:
                    assert k < 400, "the subscriber never received a heartbeat"
            one = np.zeros((1, 1), np.uint8)
            for seq in (0, 1, 4):  # 2 and 3 lost
                pub.send_multipart(encode_published(_maps(seq), one))
            pub.send_multipart([b"maps", b"not json"])  # undecodable: counted, skipped
            pub.send_multipart(encode_published(_status(k, 0.5)))  # uptime went back: a new instance
            for seq in (0, 1):
                pub.send_multipart(encode_published(_maps(seq), one))
            got = [sub.recv(T) for _ in range(6)]
    assert [(g.topic, g.seq) for g in got] == [("maps", 0), ("maps", 1), ("maps", 4), ("status", k), ("maps", 0),
                                               ("maps", 1)]  # fmt: skip
    assert gaps == [Gap("maps", 2, 4)] and gaps[0].missing == 2
    assert sub.stats.n_gaps == 1 and sub.stats.missing["maps"] == 2
    assert sub.stats.bad_messages == 1 and "bad_header" in sub.stats.last_bad
    assert sub.stats.n_restarts == 1 and sub.stats.restarts[0].reason == "status uptime"


def test_subscriber_survives_a_service_restart_on_the_same_endpoint(artifact: Path) -> None:
    with serve(artifact) as first:
        publish = first.publish_endpoint
        sub = Subscriber(publish, ("maps", "scan_summary")).start()
        try:
            sub.wait_connected(T)
            with Replayer(first.ingest_endpoint, progress=False, scan_id="a") as r:
                r.send_scan(frames(4))
            assert sum(g.topic == "maps" for g in until_summary(sub)) == 4
        except BaseException:
            sub.close()
            raise
    try:
        with serve(artifact, publish=publish) as second:
            # the SUB reconnects by itself; a heartbeat of the new instance shows the restart (uptime or seq back)
            while sub.stats.n_restarts == 0:
                sub.wait_connected(T)
            with Replayer(second.ingest_endpoint, progress=False, scan_id="b") as r:
                r.send_scan(frames(2))
            maps = [g for g in until_summary(sub) if g.topic == "maps"]
    finally:
        sub.close()
    assert [(m.msg.scan_id, m.msg.seq) for m in maps] == [("b", 0), ("b", 1)]
    assert sub.stats.n_restarts >= 1
    assert sub.stats.n_gaps == 0


def test_controller_status_set_reload_and_timeout(artifact: Path, tmp_path: Path) -> None:
    with serve(artifact) as service, Controller(service.control_endpoint, timeout_ms=int(T * 1000)) as ctl:
        status = ctl.status()
        assert status.ok and status.frames_received == 0 and status.model["sha256"] == service.model.sha256
        assert ctl.set(defect_threshold=0.25).defect_threshold == 0.25
        with pytest.raises(ControlError, match="reload"):
            ctl.reload(str(tmp_path / "missing"))
        assert ctl.status().ok  # the old model is still served
        with pytest.raises(ControlError, match="nope"):
            ctl.set(defect_classes=["nope"])
    # no reply in time: a bounded wait, then the same controller asks again at once (REQ_RELAXED) and a late reply
    # to the first request is not mistaken for the answer to the second (REQ_CORRELATE)
    with sockets() as zs:
        router = zs.socket(zmq.ROUTER)
        router.bind("tcp://127.0.0.1:*")

        def slow_server() -> None:
            first = router.recv_multipart()  # left unanswered until the second request is in
            second = router.recv_multipart()
            router.send_multipart([*first[:-1], b'{"ok": true, "detail": "late"}'])
            router.send_multipart([*second[:-1], b'{"ok": true, "detail": "second"}'])

        server = threading.Thread(target=slow_server)
        server.start()
        try:
            with Controller(router.getsockopt_string(zmq.LAST_ENDPOINT), timeout_ms=int(T * 1000)) as ctl:
                with pytest.raises(ControlTimeoutError):
                    ctl.status(timeout_ms=50)
                assert ctl.status().detail == "second"
        finally:
            server.join(T)


def test_watch_prints_the_table_and_saves_pngs(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stop = threading.Event()
    with serve(artifact) as service, sockets() as zs:
        push = zs.socket(zmq.PUSH)
        push.connect(service.ingest_endpoint)

        def produce() -> None:  # a detector streaming until the viewer has had enough
            k = 0
            while not stop.is_set():
                push_frame(push, "w", k, frames(1, seed=k)[0])
                k += 1
                stop.wait(0.02)  # pacing of the producer, not a wait for a socket

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            rc = main(["watch", "--endpoint", service.publish_endpoint, "--frames", "3", "--png-dir",
                       str(tmp_path / "png"), "--duration", str(T), "--interval", "0.05"])  # fmt: skip
        finally:
            stop.set()
            producer.join(T)
    out = capsys.readouterr().out
    assert rc == 0
    assert "frames/s" in out and "latency ms" in out and "classes" in out and "seq gaps   0" in out
    assert "\x1b[" not in out  # not a terminal: plain blocks
    pngs = sorted((tmp_path / "png").glob("w_*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("client", [Subscriber, Controller])
def test_a_bad_endpoint_fails_start_and_leaves_nothing_open(client: type[Subscriber] | type[Controller]) -> None:
    # The subscriber's monitor socket once kept its own context's term() waiting forever here.
    c = client("bogus://nowhere")
    with pytest.raises(zmq.ZMQError):
        c.start()
    assert c._sock is None and c._ctx is None
    c.close()  # and closing again is harmless
