"""Scale-out as DESIGN.md draws it: two service workers pull from one producer (PUSH round-robins) and their PUB sockets
connect to one proxy's XSUB (``publish_connect``); a subscriber on the proxy's XPUB receives every frame's maps exactly
once. The proxy's other mode (it connects ``upstream`` to bound PUB sockets) is checked with a bare PUB socket.
Handshakes, not sleeps: the producer's monitor shows both workers connected, the subscriber waits for a heartbeat of
each worker (told apart by model name)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from zmq.utils.monitor import recv_monitor_message
from zmq_helpers import push_frame, sockets

from atomstream.cli import main
from streamer.proxy import Proxy, ProxyError
from streamer.service.config import ConfigError, ServiceConfig
from streamer.service.facade import Service
from streamer.wire.client import Subscriber
from streamer.wire.protocol import ScanEnd, ScanStart, encode

T = 20.0


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    with Proxy("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") as running:
        yield running


@pytest.fixture(scope="module")
def workers(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Service]]:
    with ExitStack() as stack:
        services = []
        for name in ("worker-a", "worker-b"):
            cfg = ServiceConfig(
                artifact=make_artifact(tmp_path_factory.mktemp(name), seed=7, name=name),
                ingest="tcp://127.0.0.1:0",
                publish=proxy.xsub_endpoint,
                publish_connect=True,
                control="tcp://127.0.0.1:0",
                metrics_port=None,
                status_interval_s=0.05,
                linger_ms=0,
            )
            service = stack.enter_context(Service(cfg))
            service.wait_ready(T)
            services.append(service)
        yield services


def test_two_workers_connected_to_one_proxy_publish_every_frame_once(proxy: Proxy, workers: list[Service]) -> None:
    n = 24
    frames = np.random.default_rng(1).random((n, 48, 40), dtype=np.float32)
    assert all(w.publish_endpoint == proxy.xsub_endpoint for w in workers)
    with (
        Subscriber(proxy.xpub_endpoint, ("maps", "scan_summary"), track_seq=False) as sub,
        sockets() as zs,
    ):
        seen: set[str] = set()
        while len(seen) < 2:  # a heartbeat from each worker: both subscriptions went through the proxy
            status = sub.wait_connected(T)
            seen.add(status.model.name)
        push = zs.socket(zmq.PUSH)
        monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        for w in workers:
            push.connect(w.ingest_endpoint)
        for _ in workers:  # both peers connected, so PUSH round-robins between them
            assert monitor.poll(T * 1000)
            recv_monitor_message(monitor)
        push.disable_monitor()
        monitor.close(linger=0)
        for _ in workers:  # every worker gets its own scan_start/scan_end so each publishes a summary
            push.send_multipart(encode(ScanStart(scan_id="s")))
        for k in range(n):
            push_frame(push, "s", k, frames[k])
        for _ in workers:
            push.send_multipart(encode(ScanEnd(scan_id="s")))
        maps, summaries = [], 0
        while len(maps) < n or summaries < 2:
            got = sub.recv(T)
            if got.topic == "maps":
                maps.append(got)
            else:
                summaries += 1
    assert sorted(m.msg.frame_id for m in maps) == list(range(n))  # every frame once, none twice
    by_worker = {name: sum(m.msg.model.name == name for m in maps) for name in seen}
    assert sum(by_worker.values()) == n and min(by_worker.values()) > 0  # round-robin: both worked


def test_proxy_connects_upstream_to_a_bound_pub() -> None:
    with sockets() as zs:
        pub = zs.socket(zmq.PUB)
        pub.bind("tcp://127.0.0.1:*")
        with Proxy("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", upstream=[pub.getsockopt_string(zmq.LAST_ENDPOINT)]) as p:
            sub = zs.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"status")
            sub.connect(p.xpub_endpoint)
            deadline = time.monotonic() + T
            while not sub.poll(10, zmq.POLLIN):  # resend until the subscription has travelled SUB → proxy → PUB
                assert time.monotonic() < deadline, "nothing came through the proxy"
                pub.send_multipart([b"status", b"hello"])
            assert sub.recv_multipart() == [b"status", b"hello"]


def test_publish_connect_refuses_port_zero() -> None:
    with pytest.raises(ConfigError, match="actual port"):
        ServiceConfig.load(overrides={"publish": "tcp://127.0.0.1:0", "publish_connect": True})


def test_proxy_refuses_a_busy_endpoint_and_stops_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with Proxy("tcp://127.0.0.1:0", "tcp://127.0.0.1:0") as proxy:
        taken = proxy.xsub_endpoint
        with pytest.raises(ProxyError, match="cannot bind the proxy's xsub"):
            Proxy(taken, "tcp://127.0.0.1:0").start()
    with pytest.raises(ProxyError, match="needs a transport"):
        Proxy("127.0.0.1:5560", "tcp://127.0.0.1:0")
    assert main(["proxy", "--xsub", "tcp://127.0.0.1:0", "--xpub", "tcp://127.0.0.1:0", "--duration", "0.01"]) == 0
    out = capsys.readouterr().out
    assert '"event": "ready"' in out and '"event": "stopped"' in out
