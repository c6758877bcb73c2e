"""Socket helpers for tests: every socket tracked and closed with linger=0, every receive bounded by a timeout.

No sleeps anywhere: a subscriber is known to be connected once it has received a ``status`` heartbeat (the PUB/SUB
slow-joiner problem), and a test waits for the service to have *received* frames by asking the control socket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamer.service.config import ServiceConfig
from streamer.wire.protocol import ScanEnd, ScanStart, decode_published, encode, frame_message

__all__ = [
    "TIMEOUT_S",
    "Sockets",
    "collect",
    "control",
    "handshake_succeeds",
    "metric_value",
    "push_frame",
    "push_scan",
    "recv_published",
    "service_config",
    "slow_subscriber",
    "sockets",
    "subscribe",
    "wait_until_received",
]

TIMEOUT_S = 20.0


class Sockets:
    """A private context whose sockets are all closed with linger=0 on ``close``."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._tracked: list[zmq.Socket[bytes]] = []

    def socket(self, kind: int, *, timeout_ms: int = int(TIMEOUT_S * 1000)) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self._tracked.append(sock)
        return sock

    def close(self) -> None:
        for sock in self._tracked:
            sock.close(linger=0)
        self._tracked.clear()
        self.ctx.term()


@contextmanager
def sockets() -> Iterator[Sockets]:
    s = Sockets()
    try:
        yield s
    finally:
        s.close()


def recv_published(sub: zmq.Socket[bytes], timeout_s: float = TIMEOUT_S) -> tuple[Any, list[np.ndarray]]:
    """One published message, or ``TimeoutError`` (never a hang)."""
    if not sub.poll(timeout_s * 1000, zmq.POLLIN):
        raise TimeoutError(f"nothing published within {timeout_s} s")
    return decode_published(sub.recv_multipart())


def subscribe(zs: Sockets, endpoint: str, *, timeout_s: float = TIMEOUT_S) -> zmq.Socket[bytes]:
    """A SUB socket on every topic, returned once a ``status`` heartbeat proves it is connected."""
    sub = zs.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        msg, _ = recv_published(sub, max(0.0, deadline - time.monotonic()))
        if msg.kind == "status":
            return sub


def collect(
    sub: zmq.Socket[bytes],
    until: Callable[[list[tuple[Any, list[np.ndarray]]]], bool],
    *,
    timeout_s: float = TIMEOUT_S,
) -> list[tuple[Any, list[np.ndarray]]]:
    """Published messages other than ``status`` until ``until(collected)`` holds."""
    got: list[tuple[Any, list[np.ndarray]]] = []
    deadline = time.monotonic() + timeout_s
    while not until(got):
        msg, arrays = recv_published(sub, max(0.0, deadline - time.monotonic()))
        if msg.kind != "status":
            got.append((msg, arrays))
    return got


def push_frame(push: zmq.Socket[bytes], scan_id: str, frame_id: int, array: np.ndarray) -> None:
    push.send_multipart(encode(frame_message(scan_id, frame_id, array), array))


def push_scan(push: zmq.Socket[bytes], scan_id: str, frames: Sequence[np.ndarray], *, first_id: int = 0) -> None:
    push.send_multipart(encode(ScanStart(scan_id=scan_id)))
    for k, frame in enumerate(frames):
        push_frame(push, scan_id, first_id + k, frame)
    push.send_multipart(encode(ScanEnd(scan_id=scan_id, n_frames=len(frames))))


def control(req: zmq.Socket[bytes], request: dict[str, Any]) -> dict[str, Any]:
    """One control round trip on a REQ socket (its RCVTIMEO bounds the wait)."""
    req.send(json.dumps(request).encode())
    reply = json.loads(req.recv().decode())
    assert isinstance(reply, dict)
    return reply


def wait_until_received(req: zmq.Socket[bytes], n: int, *, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Ask ``status`` until the service has received ``n`` frames (a readiness handshake, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = control(req, {"cmd": "status"})
        if status["frames_received"] >= n:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service received {status['frames_received']} of {n} frames in {timeout_s} s")


def service_config(**fields: Any) -> ServiceConfig:
    """A service for tests: random loopback ports, CPU, fast heartbeats; ``fields`` override any of it."""
    base: dict[str, Any] = {
        "ingest": "tcp://127.0.0.1:0",
        "publish": "tcp://127.0.0.1:0",
        "control": "tcp://127.0.0.1:0",
        "metrics_port": 0,
        "status_interval_s": 0.05,
        "device": "cpu",
    }
    return ServiceConfig(**{**base, **fields})


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in Prometheus text."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def slow_subscriber(zs: Sockets, endpoint: str) -> zmq.Socket[bytes]:
    """A SUB on every topic that holds as little as ZeroMQ and the kernel allow (HWM 1, 4 KiB buffer): reading it
    slowly, or not at all, backs the publisher up as soon as possible."""
    sub = zs.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)


def handshake_succeeds(sock: zmq.Socket[bytes], endpoint: str, *, timeout_s: float = TIMEOUT_S) -> bool:
    """Connect ``sock`` and report whether the server completed the (CURVE) handshake, as its monitor says."""
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        while True:
            if not monitor.poll(timeout_s * 1000):
                raise TimeoutError(f"no handshake outcome from {endpoint} within {timeout_s} s")
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event in _HANDSHAKE_FAILED:
                return False
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
