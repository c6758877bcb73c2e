"""The subscriber library: typed messages and numpy maps from the service's PUB socket, and a control client.

``Subscriber`` hides three things every consumer of the stream would otherwise get wrong:

* **Decoding** — each ``[topic, header, *buffers]`` message becomes a ``Received`` holding the
  ``streamer.wire.protocol`` model and, for ``maps``, its arrays by name (read-only views on the received buffers: no
  copy). A malformed message is counted in ``stats.bad_messages`` and skipped, so a viewer never dies on one bad packet.
* **Loss** — ``seq`` counts messages per topic from 0 on each service instance. A jump forward is a ``Gap`` (recorded,
  counted, and passed to ``on_gap``): PUB drops messages for a slow subscriber at its high-water mark, and this is how
  a consumer finds out.
* **Restarts** — ZeroMQ's SUB reconnects by itself when a service comes back on the same endpoint, but the new
  instance counts ``seq`` from 0 again. That is a ``Restart``, not a gap. The socket's monitor reports every new
  connection after a lost one (``reason="reconnected"``); without one, a topic's ``seq`` going backwards or a
  heartbeat's ``uptime_s`` going backwards also counts. Either way every topic takes its next ``seq`` as a new
  baseline: what the new instance published before the SUB reconnected was never deliverable, and a reconnection to
  the *same* instance after a network cut is counted the same way (the headers carry no instance id to tell them
  apart), so messages published during a disconnection are not reported as gaps.

``status`` is always subscribed, because restarts and ``wait_connected`` rely on the heartbeat; it is yielded only
when asked for in ``topics``. Behind a proxy with several workers, ``seq`` values of different workers interleave on
one topic, so gap tracking is meaningless there: pass ``track_seq=False``.

``Controller`` talks to the REP control socket with a bounded wait: its REQ socket is ``REQ_RELAXED`` and
``REQ_CORRELATE``, so after a timeout the next request goes out at once and a late reply to the old one is dropped.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamer.wire.protocol import (
    PUBLISH_TOPICS,
    ControlReply,
    ProtocolError,
    ReloadCommand,
    SetCommand,
    Status,
    StatusCommand,
    decode_published,
    encode_control,
)
from streamer.wire.security import ClientCurve

__all__ = [
    "ControlError",
    "ControlTimeoutError",
    "Controller",
    "Gap",
    "Received",
    "Restart",
    "Subscriber",
    "SubscriberStats",
]


@dataclass(frozen=True)
class Received:
    """One published message: its topic, the typed header, and its arrays by name (``maps`` only; else empty)."""

    topic: str
    msg: Any
    arrays: dict[str, np.ndarray]
    t_local_ns: int

    @property
    def seq(self) -> int:
        return int(getattr(self.msg, "seq", 0))


@dataclass(frozen=True)
class Gap:
    """``got - expected`` messages on ``topic`` were not received (dropped by PUB at its high-water mark, or lost)."""

    topic: str
    expected: int
    got: int

    @property
    def missing(self) -> int:
        return self.got - self.expected


@dataclass(frozen=True)
class Restart:
    """A new service instance was detected; ``reason`` says how (``seq reset on <topic>`` or ``status uptime``)."""

    reason: str
    t_local_ns: int


@dataclass
class SubscriberStats:
    """Running counts since the subscriber opened; ``gaps``/``restarts`` keep the most recent 1000 records."""

    received: collections.Counter[str] = field(default_factory=collections.Counter)
    missing: collections.Counter[str] = field(default_factory=collections.Counter)
    gaps: collections.deque[Gap] = field(default_factory=lambda: collections.deque(maxlen=1000))
    restarts: collections.deque[Restart] = field(default_factory=lambda: collections.deque(maxlen=1000))
    n_gaps: int = 0
    n_restarts: int = 0
    disconnects: int = 0
    auth_failures: int = 0
    bad_messages: int = 0
    last_bad: str = ""


_MONITORED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


class _SeqTracker:
    """Per-topic ``seq`` bookkeeping: gaps forward, restarts backward (see the module docstring)."""

    def __init__(self, stats: SubscriberStats, on_gap: Callable[[Gap], None] | None) -> None:
        self.stats = stats
        self.on_gap = on_gap
        self.expected: dict[str, int] = {}
        self.uptime: float | None = None

    def restart(self, reason: str) -> None:
        self.expected.clear()
        self.stats.n_restarts += 1
        self.stats.restarts.append(Restart(reason, time.time_ns()))

    def observe(self, topic: str, msg: Any) -> None:
        if isinstance(msg, Status):
            if self.uptime is not None and msg.uptime_s < self.uptime:
                self.restart("status uptime")
            self.uptime = msg.uptime_s
        seq = getattr(msg, "seq", None)
        if seq is None:
            return
        expected = self.expected.get(topic)
        if expected is not None and seq < expected:
            self.restart(f"seq reset on {topic}")
        elif expected is not None and seq > expected:
            gap = Gap(topic, expected, seq)
            self.stats.n_gaps += 1
            self.stats.missing[topic] += gap.missing
            self.stats.gaps.append(gap)
            if self.on_gap is not None:
                self.on_gap(gap)
        self.expected[topic] = seq + 1


class _ClientSocket:
    """One connected socket and, unless the caller lent one, the context it lives in.

    Both clients open the same way (linger 0 so a dead service never blocks exit, CURVE before connect, the context
    torn down only if the client made it) and must not leak a context when ``connect`` fails halfway; keeping that
    here means the two cannot drift apart.
    """

    def __init__(self, endpoint: str, curve: ClientCurve | None, context: zmq.Context | None) -> None:
        self.endpoint = endpoint
        self._curve = curve
        self._own_ctx = context is None
        self._ctx = context
        self._sock: zmq.Socket | None = None

    def _connect(
        self, kind: int, configure: Callable[[zmq.Socket], None], undo: Callable[[], None] | None = None
    ) -> None:
        """Open a ``kind`` socket, let ``configure`` set it up, apply CURVE and connect; undo everything on failure.

        ``undo`` closes whatever ``configure`` opened besides the socket: it must run before the context is
        terminated, because ``term`` waits for every socket of the context and would wait forever.
        """
        ctx = self._ctx if self._ctx is not None else zmq.Context()
        sock = ctx.socket(kind)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            configure(sock)
            if self._curve is not None:
                self._curve.apply(sock)
            sock.connect(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            if undo is not None:
                undo()
            if self._own_ctx:
                ctx.term()
            raise
        self._ctx, self._sock = ctx, sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def start(self: _Client) -> _Client:
        raise NotImplementedError

    def close(self) -> None:
        self._disconnect()

    def __enter__(self: _Client) -> _Client:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_Client = TypeVar("_Client", bound=_ClientSocket)


class Subscriber(_ClientSocket):
    """A SUB socket on the service's (or a proxy's) publish endpoint; a context manager.

    ``recv(timeout)`` returns the next message of the requested ``topics`` or raises ``TimeoutError``; iterating
    yields messages until ``close`` (quiet periods are waited through: the service may be restarting).
    ``wait_connected`` blocks until a heartbeat proves the subscription is live (PUB/SUB's slow joiner).
    """

    def __init__(
        self,
        endpoint: str,
        topics: Sequence[str] = PUBLISH_TOPICS,
        *,
        curve: ClientCurve | None = None,
        rcvtimeo_ms: int = 5000,
        rcvhwm: int = 10_000,
        track_seq: bool = True,
        on_gap: Callable[[Gap], None] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        unknown = [t for t in topics if t not in PUBLISH_TOPICS]
        if unknown or not topics:
            raise ValueError(f"topics {list(topics)!r}: each must be one of {', '.join(PUBLISH_TOPICS)}")
        if rcvtimeo_ms < 0:
            raise ValueError(f"rcvtimeo_ms must be >= 0, got {rcvtimeo_ms}")
        super().__init__(endpoint, curve, context)
        self.topics = tuple(topics)
        self.rcvtimeo_ms = rcvtimeo_ms
        self.stats = SubscriberStats()
        self._tracker = _SeqTracker(self.stats, on_gap) if track_seq else None
        self._rcvhwm = rcvhwm
        self._monitor: zmq.Socket | None = None
        self._lost_connection = False
        self._pending: collections.deque[Received] = collections.deque()
        self.last_status: Status | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Subscriber:
        if self._sock is not None:
            return self

        def configure(sock: zmq.Socket) -> None:
            sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
            for topic in {*self.topics, "status"}:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
            self._monitor = sock.get_monitor_socket(_MONITORED)  # before connect: the first connection is an event

        self._connect(zmq.SUB, configure, self._close_monitor)
        return self

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def close(self) -> None:
        """Close the socket (linger 0) and, if this subscriber made it, the context; safe to call twice."""
        if self._monitor is not None and self._sock is not None:
            self._sock.disable_monitor()
        self._close_monitor()
        self._disconnect()

    # ------------------------------------------------------------------ receiving
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            raise RuntimeError("the subscriber is not open; use it as a context manager or call start()")
        return self._sock

    def _connection_events(self) -> None:
        """Apply the monitor's events so far: a connection after a lost one starts a new seq baseline."""
        if self._monitor is None:
            return
        while self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.stats.disconnects += 1
                self._lost_connection = True
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.stats.auth_failures += 1
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._lost_connection:
                self._lost_connection = False
                if self._tracker is not None:
                    self._tracker.restart("reconnected")

    def _recv_any(self, deadline: float) -> Received | None:
        """The next decodable message of any subscribed topic, or None at the deadline."""
        sock = self._socket()
        while True:
            wait_ms = max(0.0, (deadline - time.monotonic()) * 1000.0)
            self._connection_events()
            ready = sock.poll(wait_ms, zmq.POLLIN)
            self._connection_events()
            if not ready:
                return None
            frames = sock.recv_multipart(copy=False)
            t_local = time.time_ns()
            try:
                msg, arrays = decode_published(frames, check_finite=False)
            except ProtocolError as exc:
                self.stats.bad_messages += 1
                self.stats.last_bad = str(exc)
                continue
            topic = msg.kind
            self.stats.received[topic] += 1
            if self._tracker is not None:
                self._tracker.observe(topic, msg)
            if isinstance(msg, Status):
                self.last_status = msg
            named = {spec.name: a for spec, a in zip(msg.arrays, arrays, strict=True)} if topic == "maps" else {}
            return Received(topic, msg, named, t_local)

    def recv(self, timeout: float | None = None) -> Received:
        """The next message of the requested topics; ``TimeoutError`` after ``timeout`` s (default ``rcvtimeo_ms``)."""
        if self._pending:
            return self._pending.popleft()
        wait = self.rcvtimeo_ms / 1000.0 if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            got = self._recv_any(deadline)
            if got is None:
                raise TimeoutError(f"no message on {list(self.topics)} from {self.endpoint} within {wait:g} s")
            if got.topic in self.topics:
                return got

    def wait_connected(self, timeout: float = 10.0) -> Status:
        """Block until a ``status`` heartbeat arrives (the subscription is then live); other messages are kept."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._recv_any(deadline)
            if got is None:
                n = self.stats.auth_failures
                refused = f"; the server refused this client's key {n} time(s)" if n else ""
                raise TimeoutError(
                    f"no status heartbeat from {self.endpoint} within {timeout:g} s: is the service running there"
                    f" (and, with CURVE, is this client's public key authorised)?{refused}"
                )
            if got.topic == "status":
                if "status" in self.topics:
                    self._pending.append(got)
                return got.msg
            if got.topic in self.topics:
                self._pending.append(got)

    def messages(self, *, duration: float | None = None) -> Iterator[Received]:
        """Messages until ``duration`` seconds have passed (forever if None); quiet periods are waited through."""
        end = None if duration is None else time.monotonic() + duration
        while end is None or time.monotonic() < end:
            step = self.rcvtimeo_ms / 1000.0
            if end is not None:
                step = min(step, max(0.0, end - time.monotonic()))
            try:
                yield self.recv(step)
            except TimeoutError:
                continue

    def __iter__(self) -> Iterator[Received]:
        return self.messages()


class ControlError(RuntimeError):
    """The service answered a control request with ``ok: false``; the message is its ``detail``."""


class ControlTimeoutError(TimeoutError):
    """No reply to a control request in time (service down, busy, or this client's key not authorised)."""


class Controller(_ClientSocket):
    """A REQ client of the service's control socket; every request waits at most ``timeout_ms``."""

    def __init__(
        self,
        endpoint: str,
        *,
        curve: ClientCurve | None = None,
        timeout_ms: int = 5000,
        context: zmq.Context | None = None,
    ) -> None:
        if timeout_ms < 1:
            raise ValueError(f"timeout_ms must be >= 1, got {timeout_ms}")
        super().__init__(endpoint, curve, context)
        self.timeout_ms = timeout_ms

    def start(self) -> Controller:
        if self._sock is None:

            def configure(sock: zmq.Socket) -> None:
                sock.setsockopt(zmq.REQ_RELAXED, 1)
                sock.setsockopt(zmq.REQ_CORRELATE, 1)
                sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)

            self._connect(zmq.REQ, configure)
        return self

    def request(self, command: StatusCommand | ReloadCommand | SetCommand, *, timeout_ms: int | None = None) -> Any:
        """Send one command and return the ``ControlReply`` (``ok`` may be false); ``ControlTimeoutError`` if none."""
        if self._sock is None:
            raise RuntimeError("the controller is not open; use it as a context manager or call start()")
        wait = self.timeout_ms if timeout_ms is None else timeout_ms
        try:
            self._sock.send(encode_control(command))
        except zmq.Again:
            raise ControlTimeoutError(f"could not send {command.cmd!r} to {self.endpoint} within {wait} ms") from None
        if not self._sock.poll(wait, zmq.POLLIN):
            raise ControlTimeoutError(
                f"no reply to {command.cmd!r} from {self.endpoint} within {wait} ms: is the service running"
                " (and, with CURVE, is this client's public key authorised)?"
            )
        return ControlReply.model_validate_json(self._sock.recv())

    def _checked(self, command: StatusCommand | ReloadCommand | SetCommand, timeout_ms: int | None) -> Any:
        reply = self.request(command, timeout_ms=timeout_ms)
        if not reply.ok:
            raise ControlError(f"{command.cmd} refused by {self.endpoint}: {reply.detail}")
        return reply

    def status(self, *, timeout_ms: int | None = None) -> Any:
        """The service's counters, model and defect settings (a ``ControlReply`` with extra fields)."""
        return self._checked(StatusCommand(), timeout_ms)

    def reload(self, artifact: str, *, timeout_ms: int | None = None) -> Any:
        """Load another artifact; the service keeps the old model if this fails (``ControlError``)."""
        return self._checked(ReloadCommand(artifact=str(artifact)), timeout_ms)

    def set(
        self,
        *,
        defect_classes: Sequence[str | int] | None = None,
        defect_threshold: float | None = None,
        timeout_ms: int | None = None,
    ) -> Any:
        """Change the defect rule (classes by name or index, and/or the score threshold)."""
        command = SetCommand(
            defect_classes=None if defect_classes is None else list(defect_classes), defect_threshold=defect_threshold
        )
        return self._checked(command, timeout_ms)
