"""The scale-out proxy: many service workers publish into one XSUB, every subscriber reads one XPUB.

::

    worker 1 PUB ─connect─▶ ┌───────── Proxy ─────────┐
    worker 2 PUB ─connect─▶ │ XSUB (bind) ─▶ XPUB (bind) │ ◀─connect─ SUB (viewer, recorder, …)
    worker N PUB ◀─connect─ └──── (upstream: connect) ──┘

Workers either connect their PUB to the proxy's XSUB endpoint, or bind it as a single service does and the proxy
connects to them (``upstream``) — both give the same fan-in, the second needs nothing from the workers' config.
Subscriptions travel the other way (XPUB → XSUB → every worker's PUB), so workers only send what someone wants.

The forwarding loop is ``zmq.proxy_steerable`` on a thread that owns both sockets; ``stop`` sends ``TERMINATE`` on an
inproc control pair, so shutdown is clean and prompt. A failure on the thread is re-raised by ``wait_ready``/``stop``.
Each worker counts ``seq`` on its own, so subscribers on a proxy should use ``Subscriber(track_seq=False)`` and order
maps by ``frame_id``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Sequence
from types import TracebackType

import zmq

from streamer.wire.security import is_loopback
from streamer.wire.sockets import SUBSCRIPTION_BYTES, bind_endpoint

__all__ = ["Proxy", "ProxyError"]

log = logging.getLogger("atomstream.proxy")

_HWM = 100_000


class ProxyError(RuntimeError):
    """The proxy cannot run (endpoint in use, thread failed); the cause is chained."""


class Proxy:
    """XSUB/XPUB forwarder on a thread; a context manager with ``start``/``wait_ready``/``stop``.

    ``xsub``/``xpub``: endpoints to bind (port 0 or ``*``: a free port; read the bound ones from ``xsub_endpoint`` and
    ``xpub_endpoint``). ``upstream``: PUB endpoints of workers to connect to as well.
    """

    def __init__(
        self,
        xsub: str = "tcp://127.0.0.1:5560",
        xpub: str = "tcp://127.0.0.1:5561",
        *,
        upstream: Sequence[str] = (),
        hwm: int = _HWM,
    ) -> None:
        for name, endpoint in (("xsub", xsub), ("xpub", xpub), *(("upstream", u) for u in upstream)):
            if "://" not in endpoint:
                raise ProxyError(f"{name} endpoint {endpoint!r} needs a transport, e.g. 'tcp://127.0.0.1:5560'")
        self.xsub, self.xpub, self.upstream, self.hwm = xsub, xpub, tuple(upstream), hwm
        self._ctx: zmq.Context | None = None
        self._control: zmq.Socket | None = None
        self._control_addr = f"inproc://atomstream-proxy-{uuid.uuid4().hex}"
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._failure: BaseException | None = None
        self._endpoints: dict[str, str] = {}

    def start(self) -> Proxy:
        if self._thread is not None:
            raise ProxyError("the proxy was already started; create a new Proxy to start again")
        self._ctx = zmq.Context()
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.bind(self._control_addr)
        self._thread = threading.Thread(target=self._run, name="atomstream-proxy", daemon=True)
        self._thread.start()
        try:
            self.wait_ready(30.0)
        except BaseException:
            self.stop()  # closes the control pair and the context; re-raises the thread's failure
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Block until both sockets are bound; re-raises the thread's failure."""
        if not self._bound.wait(timeout):
            raise TimeoutError(f"the proxy did not bind within {timeout} s")
        self._check()

    def _check(self) -> None:
        if self._failure is not None:
            raise ProxyError(f"the proxy failed: {self._failure}") from self._failure

    def stop(self) -> None:
        """Stop forwarding and close every socket; safe to call twice."""
        if self._thread is not None and self._control is not None:
            if self._thread.is_alive():
                with contextlib.suppress(zmq.Again):  # zmq.Again: the loop already ended (it failed)
                    self._control.send(b"TERMINATE", zmq.NOBLOCK)
            self._thread.join(10.0)
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None
        if self._ctx is not None and (self._thread is None or not self._thread.is_alive()):
            self._ctx.term()
            self._ctx = None
        self._check()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def xsub_endpoint(self) -> str:
        """The bound XSUB endpoint (workers' PUB sockets connect here)."""
        return self._endpoint("xsub")

    @property
    def xpub_endpoint(self) -> str:
        """The bound XPUB endpoint (subscribers connect here)."""
        return self._endpoint("xpub")

    def _endpoint(self, name: str) -> str:
        if name not in self._endpoints:
            raise ProxyError(f"the proxy's {name} socket is not bound; call start() first")
        return self._endpoints[name]

    def _run(self) -> None:
        assert self._ctx is not None
        sockets: list[zmq.Socket] = []
        try:
            frontend = self._ctx.socket(zmq.XSUB)
            backend = self._ctx.socket(zmq.XPUB)
            control = self._ctx.socket(zmq.PAIR)
            sockets = [frontend, backend, control]
            for s in sockets:
                s.setsockopt(zmq.LINGER, 0)
            frontend.setsockopt(zmq.RCVHWM, self.hwm)
            backend.setsockopt(zmq.SNDHWM, self.hwm)
            backend.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_BYTES)  # subscribers send only subscriptions
            exposed = [e for e in (self.xsub, self.xpub) if not is_loopback(e)]
            if exposed:
                log.warning(
                    "the proxy listens on %s beyond loopback without authentication (it does not speak CURVE): "
                    "anyone who can reach the XSUB side can publish maps, the XPUB side read them",
                    ", ".join(exposed),
                )
            control.connect(self._control_addr)
            for name, sock, endpoint in (("xsub", frontend, self.xsub), ("xpub", backend, self.xpub)):
                self._endpoints[name] = bind_endpoint(sock, endpoint, f"the proxy's {name} socket", ProxyError)
            for endpoint in self.upstream:
                frontend.connect(endpoint)
            self._bound.set()
            zmq.proxy_steerable(frontend, backend, None, control)
        except BaseException as exc:
            self._failure = exc
        finally:
            self._bound.set()
            for s in sockets:
                s.close(linger=0)
