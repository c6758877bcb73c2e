"""Overload on the publish side: subscribers slower than the service.

A subscriber that never reads cannot stall ingest: PUB drops for it alone (its ``seq`` shows the gaps) while a fast
subscriber gets everything; a reliable subscriber gets every map. The queue's policies for a producer faster than
the encoder (``block``, ``drop_oldest``) are held once, exactly, with a gated encoder, in test_streamer_service.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from zmq.utils.monitor import recv_monitor_message
from zmq_helpers import Sockets, collect, control, service_config, slow_subscriber, subscribe

from streamer.maps.encoder import Encoder, load
from streamer.service.config import ServiceConfig
from streamer.service.facade import Service
from streamer.wire.protocol import decode_published, encode, frame_message
from streamer.wire.security import CurveConfig, generate_keys, secure_client_socket

TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    # stride 64: few patches per frame, so big frames (to fill socket buffers) stay cheap to encode
    artifact = make_artifact(tmp_path_factory.mktemp("overload"), stride=(64, 64), seed=4)
    return load(artifact, backend="onnx", device="cpu", batch_sizes=(1,))


@pytest.fixture(scope="module")
def wide_encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    """Stride 8, 16 classes, 8 latents: ~100 KiB of maps per 256x256 frame, to fill a subscriber's buffers fast."""
    artifact = make_artifact(tmp_path_factory.mktemp("wide"), n_classes=16, latent_dim=8, seed=6)
    return load(artifact, backend="onnx", device="cpu", batch_sizes=(1,))


def _config(**fields: Any) -> ServiceConfig:
    return service_config(**{"max_wait_ms": 0.0, **fields})


def _kinds(got: list[tuple[Any, list[np.ndarray]]], kind: str) -> list[Any]:
    return [m for m, _ in got if m.kind == kind]


def test_a_subscriber_that_never_reads_does_not_stall_ingest(wide_encoder: Encoder, zs: Sockets) -> None:
    n, hwm = 300, 50
    frame = np.random.default_rng(2).random((256, 256)).astype(np.float32)
    with Service(_config(send_hwm=hwm, max_batch_patches=4096), encoder=wide_encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        stuck = zs.socket(zmq.SUB)
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.connect(svc.publish_endpoint)
        while decode_published(stuck.recv_multipart())[0].kind != "status":  # connected (bounded by RCVTIMEO)
            pass
        fast = subscribe(zs, svc.publish_endpoint)
        req = zs.socket(zmq.REQ)
        req.connect(svc.control_endpoint)
        push = zs.socket(zmq.PUSH, timeout_ms=int(TIMEOUT_S * 1000))
        push.connect(svc.ingest_endpoint)
        done = threading.Event()

        def produce() -> None:
            for k in range(n):
                push.send_multipart(encode(frame_message("s", k, frame), frame))
            done.set()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        got = collect(fast, lambda got: len(_kinds(got, "maps")) == n, timeout_s=TIMEOUT_S)
        producer.join(TIMEOUT_S)
        assert done.is_set()
        status = control(req, {"cmd": "status"})
    stuck_seqs = []
    while stuck.poll(200, zmq.POLLIN):  # the service is gone (no more heartbeats): read what the stuck one was left
        msg, _ = decode_published(stuck.recv_multipart())
        if msg.kind == "maps":
            stuck_seqs.append(msg.seq)
    maps = _kinds(got, "maps")
    assert [m.frame_id for m in maps] == list(range(n)) and [m.seq for m in maps] == list(range(n))
    assert status["frames_published"] == n and status["queue_depth"] == 0
    assert len(stuck_seqs) < n / 2, f"the stuck subscriber got {len(stuck_seqs)} of {n}: PUB should have dropped"
    gaps = sum(b - a - 1 for a, b in zip([-1, *stuck_seqs], stuck_seqs, strict=False))
    assert stuck_seqs == sorted(stuck_seqs) and gaps + (n - 1 - (stuck_seqs[-1] if stuck_seqs else -1)) > n / 2
    print(f"\nstuck subscriber: {len(stuck_seqs)} of {n} maps ({gaps} missing between the seqs it got, the rest after)")


def test_a_reliable_subscriber_gets_every_map_even_when_slow(encoder: Encoder, zs: Sockets) -> None:
    n = 200
    frame = np.random.default_rng(3).random((512, 512)).astype(np.float32)
    cfg = _config(send_hwm=5, publish_reliable="tcp://127.0.0.1:0")
    with Service(cfg, encoder=encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        controller = slow_subscriber(zs, svc.publish_reliable_endpoint or "")
        while decode_published(controller.recv_multipart())[0].kind != "status":  # connected
            pass
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        producer = threading.Thread(
            target=lambda: [push.send_multipart(encode(frame_message("r", k, frame), frame)) for k in range(n)],
            daemon=True,
        )
        producer.start()
        seqs = []
        while len(seqs) < n:
            msg, _ = decode_published(controller.recv_multipart())
            if msg.kind == "maps":
                assert msg.seq == len(seqs), f"maps seq {msg.seq} after {len(seqs)} maps: the reliable socket dropped"
                seqs.append(msg.seq)
            time.sleep(0.002)  # a slow consumer (not a wait for a socket)
        producer.join(TIMEOUT_S)
    assert seqs == list(range(n))


def test_the_reliable_socket_is_curve_protected_like_the_others(encoder: Encoder, zs: Sockets, tmp_path: Path) -> None:
    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    client_public, client_secret = generate_keys(tmp_path / "clients", "viewer")
    (tmp_path / "authorized").mkdir()
    shutil.copy(client_public, tmp_path / "authorized" / client_public.name)
    curve = CurveConfig(server_secret_file=server_secret, authorized_keys_dir=tmp_path / "authorized")
    with Service(_config(publish_reliable="tcp://127.0.0.1:0", curve=curve), encoder=encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        endpoint = svc.publish_reliable_endpoint or ""
        plain = zs.socket(zmq.SUB)  # no CURVE: the handshake must fail
        monitor = plain.get_monitor_socket()
        plain.connect(endpoint)
        events: list[int] = []
        while not events or events[-1] not in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_SUCCEEDED):
            assert monitor.poll(TIMEOUT_S * 1000), "no handshake outcome"
            events.append(recv_monitor_message(monitor)["event"])
        plain.disable_monitor()
        monitor.close(linger=0)
        assert events[-1] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        secure = zs.socket(zmq.SUB)
        secure_client_socket(secure, client_secret_file=client_secret, server_public_file=server_public)
        secure.setsockopt(zmq.SUBSCRIBE, b"status")
        secure.connect(endpoint)
        msg, _ = decode_published(secure.recv_multipart())  # bounded by RCVTIMEO
    assert msg.kind == "status"
