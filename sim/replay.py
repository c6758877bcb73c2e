"""The producer: replays a scan into the streaming service as a detector would, over a ZeroMQ PUSH socket.

One pass over the frames is one scan: ``scan_start``, ``frame``…, ``scan_end`` (wire protocol v1, DESIGN.md). With
``loop=N`` the pass repeats N times, each pass its own scan (``scan_id`` ``"<base>"`` for a single pass, else
``"<base>.<k>"``), while ``frame_id`` keeps increasing across passes — the service's per-scan summaries stay
meaningful and subscribers that order by ``frame_id`` never see it go backwards. Each frame's ``meta`` carries
``loop`` and ``index`` (its position in the file), and the scan's ``pixel_size``/``pixel_unit`` when it has one.

Pacing: ``fps`` schedules frame k at ``t0 + k/fps`` (no drift accumulates); ``fps=None`` or ``0`` sends as fast as
the peer takes them. Back-pressure is ZeroMQ's: at ``hwm`` queued frames a send blocks, and a send blocked for
``send_timeout_ms`` (nobody listening, or a stuck service) raises :class:`ReplayError` instead of hanging. In
connect mode the socket is ``IMMEDIATE``, so frames are never queued for a peer that has not connected.

Stopping never tears a message in half: when the ``stop`` event is set (the CLI sets it on the first Ctrl-C; this
module installs no signal handler, library code leaves the process's signals alone), the current frame finishes,
``scan_end`` goes out for the open scan, and the summary says ``interrupted=True``. Closing waits at most
``linger_ms`` for queued frames to leave.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import zmq
from tqdm import tqdm

from streamer.wire.protocol import SUPPORTED_DTYPES, Frame, ScanEnd, ScanStart, encode

__all__ = ["ReplayError", "ReplaySummary", "Replayer", "replay", "wire_dtype"]

# lossless (or the closest) supported dtype for arrays the wire cannot carry as they are
_COERCE = {"bool": "uint8", "int8": "int16", "float16": "float32", "uint32": "float64", "int64": "float64"}


class ReplayError(RuntimeError):
    """The replay cannot proceed (no peer, closed replayer, bad frames); the message says which and why."""


@dataclass(frozen=True)
class ReplaySummary:
    """What was sent: frames and payload bytes queued to ZeroMQ, wall seconds, achieved frames per second."""

    frames: int
    bytes: int
    seconds: float
    fps: float
    scans: int
    interrupted: bool = False
    scan_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        state = " (interrupted)" if self.interrupted else ""
        return (
            f"sent {self.frames} frames in {self.scans} scan(s), {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.2f} s ({self.fps:.1f} fps){state}"
        )


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a frame travels as: itself when the protocol supports it, else the nearest wider one."""
    name = np.dtype(dtype).name
    if name in SUPPORTED_DTYPES:
        return np.dtype(name)
    if name in _COERCE:
        return np.dtype(_COERCE[name])
    raise ReplayError(f"frames of dtype {name} cannot be sent; convert them to one of {', '.join(SUPPORTED_DTYPES)}")


def _calibration(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The scan's pixel size (``pixel_size`` and ``unit``/``pixel_unit``, as ``read_scan`` finds them) for each
    frame's meta, where the service takes it from into the maps and defects."""
    size = meta.get("pixel_size")
    if size is None:
        return {}
    unit = meta.get("pixel_unit", meta.get("unit"))
    return {"pixel_size": float(size), **({"pixel_unit": str(unit)} if unit else {})}


class Replayer:
    """A PUSH socket that sends scans; use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = False,
        fps: float | None = None,
        loop: int = 1,
        scan_id: str | None = None,
        hwm: int = 100,
        send_timeout_ms: int = 10_000,
        linger_ms: int = 5_000,
        progress: bool = True,
    ) -> None:
        if loop < 1:
            raise ValueError(f"loop must be >= 1, got {loop}")
        if fps is not None and fps < 0:
            raise ValueError(f"fps must be positive, or None/0 for as fast as possible; got {fps}")
        if hwm < 1 or send_timeout_ms < 1 or linger_ms < 0:
            raise ValueError(
                f"need hwm >= 1, send_timeout_ms >= 1, linger_ms >= 0; got {hwm}, {send_timeout_ms}, {linger_ms}"
            )
        self.endpoint = endpoint
        self.bind = bind
        self.fps = fps or None
        self.loop = loop
        self.scan_id = scan_id or f"replay-{uuid.uuid4().hex[:8]}"
        self.hwm = hwm
        self.send_timeout_ms = send_timeout_ms
        self.linger_ms = linger_ms
        self.progress = progress
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._next_frame_id = 0
        self._stalled = False  # a send timed out: the peer is gone, do not wait again to say goodbye

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Replayer:
        if self._sock is not None:
            return self
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.SNDTIMEO, self.send_timeout_ms)
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        try:
            if self.bind:
                sock.bind(self.endpoint)
            else:
                sock.setsockopt(zmq.IMMEDIATE, 1)
                sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            ctx.term()
            verb = "bind to" if self.bind else "connect to"
            raise ReplayError(f"cannot {verb} {self.endpoint!r}: {exc}") from exc
        self._ctx, self._sock = ctx, sock
        return self

    @property
    def last_endpoint(self) -> str:
        """The endpoint in use, with a wildcard port (``tcp://127.0.0.1:*`` when binding) resolved."""
        if self._sock is None:
            raise ReplayError("the replayer is not started")
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self) -> None:
        """Close the socket, waiting at most ``linger_ms`` for queued frames; safe to call twice."""
        if self._sock is not None:
            self._sock.close(linger=self.linger_ms)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> Replayer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- sending
    def _send(self, frames: list[bytes | memoryview], what: str) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again:
            self._stalled = True
            raise ReplayError(
                f"no peer took {what} within {self.send_timeout_ms} ms on {self.endpoint!r} "
                f"({'bound' if self.bind else 'connected'}); is the service running? "
                "(raise send_timeout_ms, --send-timeout-ms on the command line, to wait longer)"
            ) from None

    def send_scan(
        self,
        frames: np.ndarray | Sequence[np.ndarray],
        meta: Mapping[str, Any] | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> ReplaySummary:
        """Send ``frames`` (N×H×W, or a sequence of H×W arrays) ``loop`` times, until ``stop`` is set (module
        docstring)."""
        if self._sock is None:
            raise ReplayError("the replayer is not started; use it as a context manager or call start()")
        n = len(frames)
        if n == 0:
            raise ReplayError("no frames to send")
        meta = dict(meta or {})
        calibration = _calibration(meta)
        stop = threading.Event() if stop is None else stop
        sent = nbytes = scans = 0
        scan_ids: list[str] = []
        bar = tqdm(total=n * self.loop, unit="frame", disable=not self.progress, leave=False)
        t0 = time.perf_counter()
        with bar:
            for k in range(self.loop):
                if stop.is_set():
                    break
                sid = self.scan_id if self.loop == 1 else f"{self.scan_id}.{k}"
                self._send(encode(ScanStart(scan_id=sid, meta=meta)), f"scan_start of {sid!r}")
                scans += 1
                scan_ids.append(sid)
                in_scan = 0
                try:
                    for i in range(n):
                        if stop.is_set():
                            break
                        if self.fps:
                            delay = t0 + sent / self.fps - time.perf_counter()
                            if delay > 0 and stop.wait(delay):
                                break
                        arr = np.asarray(frames[i])
                        if arr.ndim != 2:
                            raise ReplayError(f"frame {i} has shape {arr.shape}; frames must be 2-D (H, W)")
                        arr = arr.astype(wire_dtype(arr.dtype), copy=False)
                        fid = self._next_frame_id
                        msg = Frame(
                            scan_id=sid,
                            frame_id=fid,
                            dtype=arr.dtype.name,
                            shape=list(arr.shape),
                            t_acq_ns=time.time_ns(),
                            meta={"loop": k, "index": i, **calibration},
                        )
                        self._send(encode(msg, arr), f"frame {fid}")
                        self._next_frame_id += 1
                        sent += 1
                        in_scan += 1
                        nbytes += arr.nbytes
                        bar.update(1)
                finally:
                    # close the open scan even on error or interrupt, unless the peer is gone (it would time out)
                    if not self._stalled:
                        self._send(encode(ScanEnd(scan_id=sid, n_frames=in_scan)), f"scan_end of {sid!r}")
        seconds = time.perf_counter() - t0
        return ReplaySummary(
            frames=sent,
            bytes=nbytes,
            seconds=seconds,
            fps=sent / seconds if seconds > 0 else 0.0,
            scans=scans,
            interrupted=stop.is_set(),
            scan_ids=tuple(scan_ids),
        )


def replay(
    frames: np.ndarray | Sequence[np.ndarray],
    endpoint: str,
    *,
    meta: Mapping[str, Any] | None = None,
    bind: bool = False,
    fps: float | None = None,
    loop: int = 1,
    scan_id: str | None = None,
    hwm: int = 100,
    send_timeout_ms: int = 10_000,
    linger_ms: int = 5_000,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> ReplaySummary:
    """Open a :class:`Replayer`, send the scan, close it; the one-call form used by ``atomstream replay``."""
    with Replayer(
        endpoint,
        bind=bind,
        fps=fps,
        loop=loop,
        scan_id=scan_id,
        hwm=hwm,
        send_timeout_ms=send_timeout_ms,
        linger_ms=linger_ms,
        progress=progress,
    ) as r:
        return r.send_scan(frames, meta, stop=stop)
