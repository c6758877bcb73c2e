"""CURVE on: a client without an authorised key can neither inject a frame, nor read a map, nor send a command; an
authorised one can do all three. Waits are handshakes: a refused client's socket monitor reports the failed
authentication, an accepted subscriber receives a heartbeat."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from zmq_helpers import Sockets, handshake_succeeds, push_frame, push_scan, sockets

from atomstream.cli import main
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.wire.client import Controller, ControlTimeoutError, Subscriber
from streamer.wire.security import ClientCurve, CurveConfig, SecurityError, generate_keys, secure_client_socket

T = 20.0


@dataclass(frozen=True)
class Keys:
    server: CurveConfig
    server_public: Path
    good: ClientCurve
    bad: ClientCurve  # a well-formed keypair the service was never told about


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    server_public, server_secret = generate_keys(root / "server", "server")
    good_public, good_secret = generate_keys(root / "clients", "good")
    _, bad_secret = generate_keys(root / "intruder", "bad")
    (root / "authorized").mkdir()
    shutil.copy(good_public, root / "authorized" / good_public.name)
    return Keys(
        server=CurveConfig(server_secret_file=server_secret, authorized_keys_dir=root / "authorized"),
        server_public=server_public,
        good=ClientCurve(client_secret_file=good_secret, server_public_file=server_public),
        bad=ClientCurve(client_secret_file=bad_secret, server_public_file=server_public),
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Service]:
    cfg = ServiceConfig(
        artifact=make_artifact(tmp_path_factory.mktemp("secure"), seed=5),
        ingest="tcp://127.0.0.1:0",
        publish="tcp://127.0.0.1:0",
        control="tcp://127.0.0.1:0",
        metrics_port=None,
        status_interval_s=0.05,
        linger_ms=0,
        curve=keys.server,
    )
    with Service(cfg) as svc:
        svc.wait_ready(T)
        yield svc


def refused(zs: Sockets, kind: int, endpoint: str, curve: ClientCurve | None) -> zmq.Socket[bytes]:
    """A connected socket of ``kind`` returned once the server has turned its handshake down."""
    sock = zs.socket(kind)
    if curve is not None:
        secure_client_socket(sock, client_secret_file=curve.client_secret_file,
                             server_public_file=curve.server_public_file)  # fmt: skip
    assert not handshake_succeeds(sock, endpoint, timeout_s=T), "the server accepted a key it was not given"
    return sock


def counts(ctl: Controller) -> tuple[int, int]:
    status = ctl.status()
    return status.frames_received, status.frames_published


@pytest.mark.parametrize("intruder", ["wrong_key", "no_curve"])
def test_unauthorised_clients_cannot_inject_read_or_command(service: Service, keys: Keys, intruder: str) -> None:
    bad = keys.bad if intruder == "wrong_key" else None
    frame = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    with (
        sockets() as zs,
        Controller(service.control_endpoint, curve=keys.good, timeout_ms=int(T * 1000)) as ctl,
        Subscriber(service.publish_endpoint, ("maps", "scan_summary"), curve=keys.good) as sub,
    ):
        sub.wait_connected(T)
        before = counts(ctl)
        # inject: the refused producer's frame never reaches the service
        evil_push = refused(zs, zmq.PUSH, service.ingest_endpoint, bad)
        evil_push.setsockopt(zmq.SNDTIMEO, 100)
        with contextlib.suppress(zmq.Again):  # no peer ever accepted the connection: the send may not even queue
            push_frame(evil_push, "evil", 0, frame)
        # read: a refused subscriber gets nothing while the authorised one gets every map
        evil_sub = refused(zs, zmq.SUB, service.publish_endpoint, bad)
        evil_sub.setsockopt(zmq.SUBSCRIBE, b"")
        # command: no reply, ever
        evil_ctl = refused(zs, zmq.REQ, service.control_endpoint, bad)
        evil_ctl.setsockopt(zmq.SNDTIMEO, 100)
        with contextlib.suppress(zmq.Again):  # refused before the request could even queue: also no command
            evil_ctl.send(b'{"cmd": "set", "defect_threshold": 0.01}')

        good_push = zs.socket(zmq.PUSH)
        keys.good.apply(good_push)
        good_push.connect(service.ingest_endpoint)
        push_scan(good_push, f"good-{intruder}", [frame, frame])
        got = []
        while not got or got[-1].topic != "scan_summary":
            got.append(sub.recv(T))
        assert [(g.msg.scan_id, g.topic) for g in got] == [(f"good-{intruder}", "maps")] * 2 + [
            (f"good-{intruder}", "scan_summary")
        ]
        after = counts(ctl)
        assert after == (before[0] + 2, before[1] + 2)  # only the authorised frames were received
        assert evil_sub.poll(100) == 0 and evil_ctl.poll(100) == 0
        assert ctl.status().defect_threshold == service.cfg.defect_threshold  # the refused `set` never ran


def test_authorised_subscriber_reports_nothing_for_a_refused_key(service: Service, keys: Keys) -> None:
    with (
        Subscriber(service.publish_endpoint, curve=keys.bad) as sub,
        pytest.raises(TimeoutError, match="refused this client's key"),
    ):
        sub.wait_connected(0.5)
    with (
        Controller(service.control_endpoint, curve=keys.bad, timeout_ms=200) as ctl,
        pytest.raises(ControlTimeoutError),
    ):
        ctl.status()


def test_keys_command_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--out", str(tmp_path), "--name", "viewer"]) == 0
    assert (tmp_path / "viewer.key").is_file() and (tmp_path / "viewer.key_secret").stat().st_mode & 0o077 == 0
    assert "authorized_keys_dir" in capsys.readouterr().out
    assert main(["keys", "--out", str(tmp_path), "--name", "viewer"]) == 2  # never overwrite a key
    assert "already exists" in capsys.readouterr().err
    public_only = ClientCurve(client_secret_file=tmp_path / "viewer.key", server_public_file=tmp_path / "viewer.key")
    with sockets() as zs, pytest.raises(SecurityError, match="only a public key"):
        public_only.apply(zs.socket(zmq.SUB))


def test_endpoints_default_to_loopback() -> None:
    cfg = ServiceConfig(artifact=Path("unused"))
    for endpoint in (cfg.ingest, cfg.publish, cfg.control):
        assert endpoint.startswith("tcp://127.0.0.1:")
    assert cfg.metrics_host == "127.0.0.1" and cfg.curve is None
