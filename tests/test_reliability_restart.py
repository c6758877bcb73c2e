"""Restarts: ``kill -9`` of ``atomstream serve`` mid-scan, a new one on the same endpoints, and every frame id sent
accounted for — by the producer and subscriber that were never restarted.

The story, one phase at a time (each step waits on an event, never on a clock):

A. frames 0..A-1 go to instance 1; once the subscriber has some maps, instance 1 is killed with SIGKILL.
B. the producer sees the disconnection (socket monitor), then sends more frames: they wait in its ZeroMQ queue.
C. instance 2 binds the same endpoints; the queued frames flow into it, and the subscriber reconnects by itself.
D. after instance 2's first heartbeat reaches the subscriber, the last frames and ``scan_end``.

Every id must then be in exactly one of: maps the subscriber received; lost in the killed process (sent in phase A,
still in its socket buffers or queue: a contiguous block right after the last map of instance 1); or published by
instance 2 before the subscriber had reconnected (``seq`` of its first map received says how many: ids just before
it). Instance 2's own count of frames received must equal what that accounting says it received.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from artifact_factory import make_artifact
from zmq.utils.monitor import recv_monitor_message
from zmq_helpers import Sockets, control

from streamer.wire.client import Subscriber
from streamer.wire.protocol import ScanEnd, ScanStart, encode, frame_message

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60.0
PHASE_A, PHASE_B, PHASE_D = 120, 40, 40


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("restarted"), seed=8)


def _serve(artifact: Path, endpoints: dict[str, str]) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-c", "import sys; from atomstream.cli import main; sys.exit(main())", "serve",
        "--artifact", str(artifact), "--device", "cpu", "--ingest", endpoints["ingest"],
        "--publish", endpoints["publish"], "--control", endpoints["control"], "--metrics-port", "none",
        "--status-interval-s", "0.05", "--log-level", "ERROR",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOMSTREAM_")}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _ready(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise AssertionError(f"atomstream serve did not print its ready line (exit code {proc.poll()})")
    event = json.loads(line)
    assert event["event"] == "ready"
    return event


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _wait_for_event(monitor: zmq.Socket[bytes], event: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if monitor.poll(100, zmq.POLLIN) and recv_monitor_message(monitor)["event"] == event:
            return
    raise TimeoutError(f"no socket event {event} within {TIMEOUT_S} s")


@pytest.mark.slow
def test_kill_9_mid_scan_loses_only_frames_in_flight_and_the_clients_carry_on(artifact: Path, zs: Sockets) -> None:
    frames = [np.random.default_rng(k).random((128, 128)).astype(np.float32) for k in range(8)]
    any_port = {name: "tcp://127.0.0.1:0" for name in ("ingest", "publish", "control")}
    first = _serve(artifact, any_port)
    second: subprocess.Popen[str] | None = None
    seen: list[tuple[int, int, int]] = []  # (frame_id, seq, subscriber restarts so far) of every maps received

    def receive_until(done: Any) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not done():
            assert sub is not None
            got = sub.recv(max(0.01, deadline - time.monotonic()))
            if got.topic == "maps":
                seen.append((got.msg.frame_id, got.msg.seq, sub.stats.n_restarts))
            elif got.topic == "scan_summary":
                summaries.append(got.msg)

    summaries: list[Any] = []
    sub: Subscriber | None = None
    push = zs.socket(zmq.PUSH)
    monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        ready = _ready(first)
        endpoints = {name: ready[name] for name in ("ingest", "publish", "control")}
        # the same sockets all the way through: neither producer nor subscriber is ever restarted
        sub = Subscriber(endpoints["publish"], topics=("maps", "scan_summary", "status"), rcvhwm=0).start()
        push.connect(endpoints["ingest"])
        sub.wait_connected(TIMEOUT_S)

        # A: a burst into instance 1, killed as soon as some of it is out
        push.send_multipart(encode(ScanStart(scan_id="r")))
        for k in range(PHASE_A):
            push.send_multipart(encode(frame_message("r", k, frames[k % 8]), frames[k % 8]))
        receive_until(lambda: len(seen) >= 10)
        t_kill_ns = time.time_ns()
        first.send_signal(signal.SIGKILL)
        assert first.wait(TIMEOUT_S) == -signal.SIGKILL

        # B: the producer notices, keeps sending; ZeroMQ queues for the peer that will come back
        _wait_for_event(monitor, zmq.EVENT_DISCONNECTED)
        for k in range(PHASE_A, PHASE_A + PHASE_B):
            push.send_multipart(encode(frame_message("r", k, frames[k % 8]), frames[k % 8]))

        # C: instance 2 on the very same endpoints
        second = _serve(artifact, endpoints)
        ready = _ready(second)
        assert {name: ready[name] for name in endpoints} == endpoints
        restarts_before = sub.stats.n_restarts
        receive_until(lambda: sub.stats.n_restarts > restarts_before and sub.last_status is not None
                      and sub.last_status.uptime_s < (time.time_ns() - t_kill_ns) / 1e9)  # fmt: skip

        # D: the rest of the scan, to instance 2 with everyone connected
        n = PHASE_A + PHASE_B + PHASE_D
        for k in range(PHASE_A + PHASE_B, n):
            push.send_multipart(encode(frame_message("r", k, frames[k % 8]), frames[k % 8]))
        push.send_multipart(encode(ScanEnd(scan_id="r", n_frames=n)))
        receive_until(lambda: bool(summaries))
        req = zs.socket(zmq.REQ)
        req.connect(endpoints["control"])
        status = control(req, {"cmd": "status"})
        restarts = sub.stats.n_restarts
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        if sub is not None:
            sub.close()
        _end(first)
        if second is not None:
            _end(second)

    # instance 1 numbered its maps from frame 0, so seq == frame id; instance 2 from its first frame, a later one
    before = [fid for fid, seq, _ in seen if fid == seq]
    after = [(fid, seq) for fid, seq, _ in seen if fid != seq]
    assert before == list(range(len(before))), "instance 1 published a prefix, in order"
    first_after_id, first_after_seq = after[0]
    offset = first_after_id - first_after_seq  # the first frame instance 2 received
    assert all(fid - seq == offset for fid, seq in after), "instance 2: one seq run, no gap"
    assert [fid for fid, _ in after] == list(range(first_after_id, n)), "instance 2: every frame from there on"

    lost_in_crash = list(range(len(before), offset))
    unseen_published = list(range(offset, first_after_id))
    accounted = sorted([*before, *lost_in_crash, *unseen_published, *(fid for fid, _ in after)])
    print(
        f"\nsent {n} frames; instance 1 maps: {len(before)} (0..{len(before) - 1}); "
        f"lost in the killed process (in its socket buffers and queue): {len(lost_in_crash)} "
        f"({lost_in_crash[:1]}..{lost_in_crash[-1:]}); published by instance 2 before the subscriber reconnected: "
        f"{len(unseen_published)} (its maps seq 0..{first_after_seq - 1}); instance 2 maps seen: {len(after)}"
    )
    assert accounted == list(range(n)), "every frame id exactly once"
    assert all(fid < PHASE_A for fid in lost_in_crash), "only frames sent before the kill may be lost"
    assert status["frames_received"] == len(unseen_published) + len(after)  # instance 2's own count agrees
    assert status["frames_published"] == status["frames_received"] and status["frames_rejected"] == 0
    (summary,) = summaries
    assert (summary.scan_id, summary.n_frames, summary.frames_received) == ("r", n, status["frames_received"])
    assert restarts >= 1, "the subscriber noticed the new instance"
