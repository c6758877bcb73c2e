"""The producer speaks DESIGN.md's wire protocol: a plain PULL client, written from the spec alone, gets every
frame intact. No sleeps: every receive has a timeout, every socket is closed with linger=0."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from atomstream.cli import main
from sim.lattice import LatticeConfig, synth_scan
from sim.replay import Replayer, ReplayError, replay

RECV_TIMEOUT_MS = 5_000


@pytest.fixture
def pull() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A PULL socket bound to a random port, as the service would bind it."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.RCVTIMEO = RECV_TIMEOUT_MS
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close(linger=0)
        ctx.term()


def _receive_all(sock: zmq.Socket[bytes], n_scans: int) -> list[tuple[dict[str, Any], list[bytes]]]:
    """Messages until ``n_scans`` scan_end headers arrived; parsed with json and nothing else."""
    out: list[tuple[dict[str, Any], list[bytes]]] = []
    ends = 0
    while ends < n_scans:
        parts = sock.recv_multipart()  # raises zmq.Again after the timeout instead of hanging
        header = json.loads(parts[0].decode("utf-8"))
        assert header["v"] == 1
        out.append((header, parts[1:]))
        ends += header["kind"] == "scan_end"
    return out


def _scan(tmp_path: Path, dtype: str = "float32") -> tuple[Path, np.ndarray]:
    frames, _ = synth_scan(LatticeConfig(shape=(37, 53), n_defects=2, dtype=dtype), 4, seed=0)  # type: ignore[arg-type]
    path = tmp_path / "scan.npy"
    np.save(path, frames)
    return path, frames


def test_cli_replay_reaches_a_plain_pull_client(tmp_path: Path, pull: tuple[zmq.Socket[bytes], str]) -> None:
    sock, endpoint = pull
    path, frames = _scan(tmp_path)
    result: list[int] = []
    argv = [
        "replay",
        str(path),
        "--endpoint",
        endpoint,
        "--loop",
        "2",
        "--no-progress",
        "--no-feedback",
        "--send-timeout-ms",
        "5000",
    ]
    worker = threading.Thread(target=lambda: result.append(main(argv)))
    worker.start()
    try:
        messages = _receive_all(sock, n_scans=2)
    finally:
        worker.join(timeout=10)
    assert result == [0]
    kinds = [h["kind"] for h, _ in messages]
    assert kinds == (["scan_start"] + ["frame"] * 4 + ["scan_end"]) * 2
    file_bytes = np.load(path)
    got = [(h, bufs) for h, bufs in messages if h["kind"] == "frame"]
    assert [h["frame_id"] for h, _ in got] == list(range(8))  # keeps counting across loops
    assert [h["scan_id"] for h, _ in got] == ["scan.0"] * 4 + ["scan.1"] * 4
    for k, (h, bufs) in enumerate(got):
        assert len(bufs) == 1 and h["dtype"] == "float32" and h["shape"] == [37, 53]
        arr = np.frombuffer(bufs[0], dtype=np.dtype(h["dtype"]).newbyteorder("<")).reshape(h["shape"])
        assert bufs[0] == file_bytes[k % 4].tobytes()
        np.testing.assert_array_equal(arr, frames[k % 4])
        assert h["meta"] == {"loop": k // 4, "index": k % 4} and isinstance(h["t_acq_ns"], int)
    ends = [h for h, _ in messages if h["kind"] == "scan_end"]
    assert [e["n_frames"] for e in ends] == [4, 4] and [e["scan_id"] for e in ends] == ["scan.0", "scan.1"]
    start = messages[0][0]
    assert start["scan_id"] == "scan.0" and start["meta"]["source"] == "npy"


def test_bind_mode_pacing_and_summary() -> None:
    frames = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    with Replayer("tcp://127.0.0.1:*", bind=True, fps=100, scan_id="paced", progress=False) as r:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.RCVTIMEO = RECV_TIMEOUT_MS
        try:
            sock.connect(r.last_endpoint)
            summary = r.send_scan(frames, {"note": "x"})
            messages = _receive_all(sock, n_scans=1)
        finally:
            sock.close(linger=0)
            ctx.term()
    assert summary.frames == 5 and summary.scans == 1 and not summary.interrupted
    assert summary.bytes == frames.nbytes
    assert summary.seconds >= 4 / 100  # frame k leaves at t0 + k/fps
    assert summary.fps == pytest.approx(5 / summary.seconds)
    assert [h["scan_id"] for h, _ in messages] == ["paced"] * 7
    assert messages[0][0]["meta"] == {"note": "x"}
    assert "sent 5 frames in 1 scan(s)" in str(summary)


def test_unsupported_dtypes_travel_widened(pull: tuple[zmq.Socket[bytes], str]) -> None:
    sock, endpoint = pull
    frames = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)
    replay(frames, endpoint, progress=False, send_timeout_ms=5000)
    got = [(h, b) for h, b in _receive_all(sock, 1) if h["kind"] == "frame"]
    assert [h["dtype"] for h, _ in got] == ["float64", "float64"]
    np.testing.assert_array_equal(np.frombuffer(got[1][1][0], "<f8").reshape(3, 4), frames[1])
    with pytest.raises(ReplayError, match="complex128 cannot be sent"):
        replay(np.zeros((1, 2, 2), complex), endpoint, progress=False)


def test_no_peer_raises_instead_of_hanging() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    probe = ctx.socket(zmq.PULL)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # the port is now free: nobody listens there
    ctx.term()
    with pytest.raises(ReplayError, match=r"no peer took scan_start .* within 200 ms"):
        replay(
            np.zeros((2, 4, 4), np.float32), f"tcp://127.0.0.1:{port}", send_timeout_ms=200, linger_ms=0, progress=False
        )


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "missing.npy"), "--no-progress"]) == 2
    assert "missing.npy: no such file" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "missing.npy"), "--loop", "0"]) == 2


class _StopAt:
    """Frames that set ``stop`` (as the CLI's Ctrl-C handler does) while frame ``at`` is being fetched."""

    def __init__(self, frames: np.ndarray, at: int, stop: threading.Event) -> None:
        self.frames, self.at, self.stop = frames, at, stop

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> np.ndarray:
        if i == self.at:
            self.stop.set()
        return self.frames[i]


def test_stop_finishes_the_frame_and_closes_the_scan(pull: tuple[zmq.Socket[bytes], str]) -> None:
    sock, endpoint = pull
    frames, stop = np.ones((6, 4, 5), np.float32), threading.Event()
    before = signal.getsignal(signal.SIGINT)
    summary = replay(_StopAt(frames, 2, stop), endpoint, loop=3, scan_id="s", progress=False, stop=stop)  # type: ignore[arg-type]
    assert summary.interrupted and summary.frames == 3 and summary.scans == 1 and summary.scan_ids == ("s.0",)
    messages = _receive_all(sock, 1)
    assert [h["kind"] for h, _ in messages] == ["scan_start", "frame", "frame", "frame", "scan_end"]
    assert messages[-1][0] == {"v": 1, "kind": "scan_end", "scan_id": "s.0", "n_frames": 3}
    assert signal.getsignal(signal.SIGINT) is before  # the library installs no handler


def test_the_cli_turns_the_first_ctrl_c_into_the_stop_event_and_the_second_into_an_interrupt() -> None:
    from atomstream.cli._interrupt import first_sigint_sets

    before = signal.getsignal(signal.SIGINT)
    with first_sigint_sets(threading.Event()) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
