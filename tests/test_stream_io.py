"""The I/O side of the service: the wake-up pipe, the I/O thread's idleness, socket setup and the accounting."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from zmq_helpers import TIMEOUT_S, Sockets, push_frame, recv_published, service_config, subscribe

from streamer.maps.encoder import Encoder, load
from streamer.service.facade import Service
from streamer.service.io_loop import WakePipe
from streamer.service.ledger import Ledger
from streamer.service.metrics import ServiceMetrics
from streamer.wire.sockets import SocketError, open_sockets


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return load(make_artifact(tmp_path_factory.mktemp("io"), seed=6), device="cpu", batch_sizes=(1,))


def test_the_wake_pipe_is_reported_by_its_file_number_and_clears() -> None:
    """The poller reports a registered file number as that number: the loop must look it up so, or it never
    clears the pipe and spins (it did, taking a core from the encoder)."""
    wake = WakePipe()
    poller = zmq.Poller()
    poller.register(wake.fileno(), zmq.POLLIN)
    try:
        assert poller.poll(0) == []
        wake.wake()
        wake.wake()
        assert dict(poller.poll(TIMEOUT_S * 1000)) == {wake.fileno(): zmq.POLLIN}
        wake.clear()
        assert poller.poll(0) == []
    finally:
        wake.close()
    wake.wake()  # after close: a no-op, not an error (threads may still say goodbye while the service stops)


def _thread_cpu_s(name: str) -> float:
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU times need Linux /proc")
def test_the_io_thread_sleeps_between_events(encoder: Encoder, zs: Sockets) -> None:
    """After frames were handled (each wakes the I/O thread), the thread waits in the poller rather than spinning:
    over a dozen heartbeats it uses a small share of one core."""
    with Service(service_config(metrics_port=None), encoder=encoder) as svc:
        svc.wait_ready(TIMEOUT_S)
        sub = subscribe(zs, svc.publish_endpoint)
        push = zs.socket(zmq.PUSH)
        push.connect(svc.ingest_endpoint)
        frame = np.random.default_rng(0).random((40, 40), dtype=np.float32)
        for k in range(3):
            push_frame(push, "s", k, frame)
        maps = 0
        while maps < 3:
            maps += recv_published(sub)[0].kind == "maps"
        cpu0, t0, heartbeats = _thread_cpu_s("atomstream-io"), time.perf_counter(), 0
        while heartbeats < 12:  # status every 50 ms: about 0.6 s of an otherwise idle service
            heartbeats += recv_published(sub)[0].kind == "status"
        share = (_thread_cpu_s("atomstream-io") - cpu0) / (time.perf_counter() - t0)
    assert share < 0.25, f"the I/O thread used {share:.0%} of a core while idle"


def test_a_taken_endpoint_is_named_and_nothing_stays_open(zs: Sockets) -> None:
    taken = zs.socket(zmq.PULL)
    taken.bind("tcp://127.0.0.1:*")
    endpoint = taken.getsockopt_string(zmq.LAST_ENDPOINT)
    with pytest.raises(SocketError, match=f"cannot bind the control socket to '{endpoint}'"):
        open_sockets(service_config(control=endpoint))
    sockets = open_sockets(service_config(publish_reliable="tcp://127.0.0.1:0"))
    try:
        assert set(sockets.endpoints) == {"ingest", "publish", "control", "publish_reliable"}
        assert all(":0" not in e for e in sockets.endpoints.values())  # the ports actually bound
    finally:
        sockets.close()


def test_the_ledger_summarises_a_scan_once_every_frame_has_an_outcome() -> None:
    metrics = ServiceMetrics()
    ledger = Ledger(metrics)
    for _ in range(4):
        ledger.received("a")
    ledger.received(None)  # a message naming no scan still counts as received
    ledger.published("a")
    ledger.failed("a", "shape_mismatch")
    ledger.ended("a", n_frames=4)
    assert ledger.summary_due("a") is None  # two frames still in flight
    ledger.failed("a", "overloaded")
    ledger.failed(None, "bad_header")
    assert ledger.summary_due("a") is None
    ledger.published("a")
    summary = ledger.summary_due("a")
    assert summary is not None and (summary.frames_received, summary.frames_published) == (4, 2)
    assert (summary.frames_rejected, summary.frames_dropped, summary.n_frames) == (1, 1, 4)
    assert ledger.summary_due("a") is None and "a" not in ledger.scans  # once, then forgotten
    assert ledger.totals == {"received": 5, "published": 2, "rejected": 2, "dropped": 1}
