"""The service's ZeroMQ sockets: created, configured, secured and bound in one place, closed in one place.

Everything here runs on the I/O thread, the sockets' only owner (ZeroMQ sockets are not thread-safe). Options per
socket: the ingest PULL's receive high-water mark (``recv_hwm``: with ``overload=block`` this is what pushes back on
the producer), the publishing sockets' send high-water mark and ``linger_ms`` (so subscribers receive the tail at
shutdown; the others close at once), CURVE on all of them when configured, each socket in the ZAP domain of its
role (``streamer.wire.security``). ``tcp://host:0`` binds a free port and the endpoints come back as actually bound.

``ZMQ_MAXMSGSIZE`` on every socket: libzmq reads each frame's length before its bytes and drops a peer that
announces more than the limit, so an oversized message is never held in memory (the ingest limit is
``max_frame_bytes``, the control limit ``max_control_bytes``; the publishing sockets only ever receive subscriptions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from streamer.wire.protocol import MAX_HEADER_BYTES
from streamer.wire.security import CurveConfig, secure_server_socket, server_auth

__all__ = [
    "SUBSCRIPTION_BYTES",
    "SocketError",
    "SocketSet",
    "SocketSettings",
    "bind_endpoint",
    "bindable",
    "open_sockets",
]

#: ``SocketSettings`` field of each socket's endpoint, in binding order; also the names of ``SocketSet.endpoints``.
NAMES = ("ingest", "publish", "control", "publish_reliable")
#: The CURVE role (ZAP domain) of each socket: who may connect to it.
ROLE_OF = {"ingest": "ingest", "publish": "publish", "control": "control", "publish_reliable": "publish"}
SUBSCRIPTION_BYTES = 4096  # a subscription frame is a topic prefix: the longest topic is 12 bytes


class SocketSettings(Protocol):
    """What ``open_sockets`` reads: the service's ``ServiceConfig`` has these fields (the wire does not import the
    service, so it names only what it needs)."""

    @property
    def ingest(self) -> str: ...
    @property
    def publish(self) -> str: ...
    @property
    def control(self) -> str: ...
    @property
    def publish_reliable(self) -> str | None: ...
    @property
    def publish_connect(self) -> bool: ...
    @property
    def recv_hwm(self) -> int: ...
    @property
    def send_hwm(self) -> int: ...
    @property
    def max_frame_bytes(self) -> int: ...
    @property
    def max_control_bytes(self) -> int: ...
    @property
    def linger_ms(self) -> int: ...
    @property
    def curve(self) -> CurveConfig | None: ...


class SocketError(RuntimeError):
    """A socket could not be bound or connected; the message names the endpoint and what to do."""


def bindable(endpoint: str) -> str:
    """``tcp://host:0`` → ``tcp://host:*`` (ZeroMQ's spelling of "any free port")."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        return endpoint[:-2] + ":*"
    return endpoint


def bind_endpoint(sock: zmq.Socket[bytes], endpoint: str, what: str, error: type[RuntimeError] = SocketError) -> str:
    """Bind ``sock`` (port 0: any free port) and return the endpoint it got; a failure is ``error`` naming ``what``.

    The service and the proxy both bind user-given endpoints, and a taken port must read the same from either.
    """
    try:
        sock.bind(bindable(endpoint))
    except zmq.ZMQError as exc:
        raise error(
            f"cannot bind {what} to {endpoint!r}: {exc}; is another process using it? (port 0 picks a free port)"
        ) from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


@dataclass
class SocketSet:
    """The service's sockets (``reliable``: the ``publish_reliable`` XPUB, or ``None``) and their endpoints."""

    context: zmq.Context[zmq.Socket[bytes]]
    pull: zmq.Socket[bytes]
    pub: zmq.Socket[bytes]
    rep: zmq.Socket[bytes]
    reliable: zmq.Socket[bytes] | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    auth: Any = None  # the CURVE authenticator thread, when CURVE is on

    @property
    def all(self) -> list[zmq.Socket[bytes]]:
        return [s for s in (self.pull, self.pub, self.rep, self.reliable) if s is not None]

    def close(self) -> None:
        """Close every socket (each with its own linger: the publishing ones flush the tail), then the context."""
        for s in self.all:
            s.close()
        if self.auth is not None:
            self.auth.stop()
        self.context.term()


def open_sockets(cfg: SocketSettings) -> SocketSet:
    """A new context with the service's sockets configured and bound (or, for ``publish_connect``, connected).

    On failure everything opened so far is closed again and ``SocketError`` says which endpoint failed.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sockets = SocketSet(ctx, *(ctx.socket(kind) for kind in (zmq.PULL, zmq.PUB, zmq.REP)))
    try:
        if cfg.publish_reliable is not None:
            sockets.reliable = ctx.socket(zmq.XPUB)
            sockets.reliable.setsockopt(zmq.XPUB_NODROP, 1)
            sockets.reliable.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        sockets.pull.setsockopt(zmq.RCVHWM, cfg.recv_hwm)
        sockets.pub.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        sockets.pull.setsockopt(zmq.MAXMSGSIZE, max(cfg.max_frame_bytes, MAX_HEADER_BYTES))
        sockets.rep.setsockopt(zmq.MAXMSGSIZE, cfg.max_control_bytes)
        for s in sockets.all:
            s.setsockopt(zmq.LINGER, 0)
        for s in (sockets.pub, sockets.reliable):
            if s is not None:
                s.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_BYTES)
        for s in (sockets.pub, sockets.reliable):
            if s is not None:
                s.setsockopt(zmq.LINGER, cfg.linger_ms)
        if cfg.curve is not None:
            sockets.auth = server_auth(ctx, cfg.curve)
            for name, s in zip(NAMES, sockets.all, strict=False):
                secure_server_socket(s, cfg.curve, ROLE_OF[name])  # type: ignore[arg-type]
        for name, s in zip(NAMES, sockets.all, strict=False):
            sockets.endpoints[name] = _attach(name, s, cfg)
    except BaseException:
        sockets.close()
        raise
    return sockets


def _attach(name: str, s: zmq.Socket[bytes], cfg: SocketSettings) -> str:
    endpoint: str = getattr(cfg, name)
    if name == "publish" and cfg.publish_connect:
        try:
            s.connect(endpoint)
        except zmq.ZMQError as exc:
            raise SocketError(
                f"cannot connect the publish socket to {endpoint!r}: {exc}; give the proxy's XSUB endpoint, e.g. "
                "'tcp://127.0.0.1:5560'"
            ) from None
        return endpoint
    return bind_endpoint(s, endpoint, f"the {name} socket")
