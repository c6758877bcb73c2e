"""What the live page shows, kept up to date by a subscriber thread.

``ViewState`` is the one owner of that state (its own lock and condition): the subscriber thread calls ``add`` for
every message, the web server's handlers call ``snapshot``/``summary``/``wait_for`` from theirs. Only the latest
*complete* frame (its ``maps`` and its ``defects``, which the service publishes right after) is kept whole; older
frames live on as one row of class fractions each, for the chart over time. Rates and latencies come from the same
``WatchTable`` that ``atomstream watch`` prints, so the page and the terminal agree.

``ViewFeed`` runs the ``Subscriber`` on a thread (``start``/``wait_ready``/``stop``, a context manager); an error on
that thread is kept and shown on the page, and re-raised by ``wait_ready``.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from types import TracebackType
from typing import Any

import numpy as np

from atomstream.cli.watch import WatchTable
from atomstream.view.snapshot import encode_snapshot

__all__ = ["ViewFeed", "ViewState"]

_MAX_SIDE = 1024  # frames larger than this are sent decimated: the page shows a few hundred pixels anyway


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(values))}


def _frame_u8(frame: np.ndarray) -> tuple[np.ndarray, int]:
    """The frame as 8-bit grey (1st–99th percentile stretch) and the decimation step used to keep it small."""
    step = max(1, math.ceil(max(frame.shape) / _MAX_SIDE))
    f = np.asarray(frame[::step, ::step], dtype=np.float32)
    finite = f[np.isfinite(f)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    scaled = np.clip((f - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
    return np.nan_to_num(scaled * 255.0).astype(np.uint8), step


class ViewState:
    """The latest complete frame, class fractions per frame, and windowed rates; thread-safe."""

    def __init__(
        self, *, endpoint: str, window_s: float = 5.0, history: int = 300, frames: np.ndarray | None = None
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1 frame, got {history}")
        self.endpoint = endpoint
        self._frames = frames
        self._cond = threading.Condition()
        self._table = WatchTable(window_s=window_s)
        self._pending: Any = None  # maps waiting for their defects message
        self._latest: tuple[Any, list[Any]] | None = None
        self._history: collections.deque[tuple[int, list[float]]] = collections.deque(maxlen=history)
        self._stats: Any = None
        self.n_frames = 0  # frames complete (maps and their defects): what the page can draw
        self.connected = False
        self.error: str | None = None
        self.version = 0

    # ---------------------------------------------------------------- writers (the subscriber thread)
    def attach(self, stats: Any) -> None:
        """The subscriber's running counts (gaps, restarts), shown with the figures."""
        with self._cond:
            self._stats = stats

    def fail(self, message: str) -> None:
        with self._cond:
            self.error = message
            self.version += 1
            self._cond.notify_all()

    def add(self, received: Any) -> None:
        """One message from the subscriber: every topic updates the figures; maps+defects make a new frame."""
        with self._cond:
            self._table.add(received)
            msg = received.msg
            if received.topic == "status":
                self.connected = True
            elif received.topic == "maps":
                self._pending = received
                cls = received.arrays.get("class")
                if cls is not None and msg.n_classes > 0:
                    counts = np.bincount(cls.reshape(-1), minlength=msg.n_classes)
                    fractions = (counts / max(int(counts.sum()), 1)).round(4).tolist()
                    self._history.append((msg.frame_id, fractions))
            elif received.topic == "defects" and self._pending is not None and self._matches_pending(msg):
                self._latest = (self._pending, list(msg.defects))
                self._pending = None
                self.n_frames += 1
            self.version += 1
            self._cond.notify_all()

    def _matches_pending(self, msg: Any) -> bool:
        return bool((msg.scan_id, msg.frame_id) == (self._pending.msg.scan_id, self._pending.msg.frame_id))

    # ---------------------------------------------------------------- readers (the web server)
    def summary(self) -> dict[str, Any]:
        """Counts as JSON: connected, maps, frames shown, errors by reason, the subscriber's gaps."""
        with self._cond:
            return self._summary()

    def _summary(self) -> dict[str, Any]:
        stats = self._stats
        return {
            "endpoint": self.endpoint,
            "connected": self.connected,
            "error": self.error,
            "n_maps": self._table.n_maps,
            "n_frames": self.n_frames,
            "errors": dict(self._table.errors),
            "gaps": 0 if stats is None else stats.n_gaps,
            "missing": 0 if stats is None else int(sum(stats.missing.values())),
            "restarts": 0 if stats is None else stats.n_restarts,
            "version": self.version,
        }

    def wait_for(self, *, min_frames: int = 0, connected: bool = False, timeout: float = 0.0) -> dict[str, Any]:
        """The summary once ``min_frames`` frames are complete — maps *and* defects, so the latest one can be drawn —
        (and a heartbeat has arrived, if asked), or at ``timeout``."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.error is not None or (self.n_frames >= min_frames and (self.connected or not connected)),
                timeout=max(0.0, timeout),
            )
            return self._summary()

    def wait_changed(self, version: int, timeout: float) -> int:
        """Block until the state differs from ``version`` (or ``timeout``); returns the current version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != version, timeout=timeout)
            return self.version

    def snapshot(self) -> bytes:
        """Everything the page draws, as one binary message (``atomstream.view.snapshot``)."""
        with self._cond:
            header = self._summary()
            fps, service, e2e, fractions, defects_per_frame = self._table.window()
            status = self._table.last_status
            header["stats"] = {
                "fps": fps,
                "window_s": self._table.window_s,
                "service_ms": _percentiles(service),
                "e2e_ms": _percentiles(e2e),
                "fractions": None if fractions is None else fractions.tolist(),
                "defects_per_frame": defects_per_frame,
                "status": None if status is None else status.model_dump(mode="json"),
            }
            header["history"] = {
                "frame_id": [f for f, _ in self._history],
                "fractions": [row for _, row in self._history],
            }
            latest = self._latest
        header["frame"], header["defects"], arrays = None, [], {}
        if latest is not None:
            header["frame"], header["defects"], arrays = self._frame_payload(*latest)
        return encode_snapshot(header, arrays)

    def _frame_payload(self, received: Any, defects: list[Any]) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
        msg, src = received.msg, received.arrays
        arrays: dict[str, np.ndarray] = {}
        if "class" in src:
            arrays["class"] = src["class"].astype(np.uint8)
        if "defect_score" in src:
            arrays["defect_score"] = src["defect_score"].astype(np.float32)
        z = src.get("z")
        for k in range(min(2, 0 if z is None else z.shape[-1])):
            arrays[f"z{k}"] = np.ascontiguousarray(z[..., k], dtype=np.float32)
        if "angle" in src:  # radians on the wire; degrees in (-180, 180] on the page
            arrays["angle"] = (np.degrees(np.angle(np.exp(1j * src["angle"].astype(np.float64))))).astype(np.float32)
        if "centers" in src:
            arrays["centers"] = src["centers"].astype(np.float32)
        frame_info: dict[str, Any] = {
            "scan_id": msg.scan_id,
            "frame_id": msg.frame_id,
            "layout": msg.layout,
            "grid": msg.grid,
            "patch": msg.patch,
            "stride": msg.stride,
            "origin": msg.origin,
            "n_classes": msg.n_classes,
            "class_names": list(msg.class_names),
            "model": {"name": msg.model.name, "version": msg.model.version, "sha256": msg.model.sha256[:12]},
            "service_ms": (msg.t_pub_ns - msg.t_recv_ns) / 1e6,
            "age_s": max(0.0, (time.time_ns() - msg.t_pub_ns) / 1e9),
            "pixel_size": msg.pixel_size,  # from the frame's meta; the page draws a scale bar with it
            "pixel_unit": msg.pixel_unit,
            "underlay": None,
        }
        if self._frames is not None and len(self._frames):
            image, step = _frame_u8(np.asarray(self._frames[msg.frame_id % len(self._frames)]))
            arrays["frame"] = image
            frame_info["underlay"] = {"shape": list(np.shape(self._frames[0])), "step": step}
        found = [{"y": d.y, "x": d.x, "class": d.class_, "score": d.score, "area": d.area} for d in defects]
        return frame_info, found, arrays


class ViewFeed:
    """The subscriber thread that feeds a ``ViewState``; a context manager (``start``/``wait_ready``/``stop``)."""

    def __init__(self, state: ViewState, *, curve: Any = None, track_seq: bool = True) -> None:
        self.state = state
        self._curve = curve
        self._track_seq = track_seq
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="atomstream-view-feed", daemon=True)

    def _run(self) -> None:
        from streamer.wire.client import Subscriber

        try:
            with Subscriber(self.state.endpoint, curve=self._curve, rcvtimeo_ms=200, track_seq=self._track_seq) as sub:
                self.state.attach(sub.stats)
                self._opened.set()
                while not self._stop.is_set():
                    try:
                        self.state.add(sub.recv(0.2))
                    except TimeoutError:
                        continue
        except Exception as exc:  # shown on the page and re-raised on the owner by wait_ready
            self._error = exc
            self.state.fail(f"subscriber on {self.state.endpoint}: {exc}")
        finally:
            self._opened.set()

    def start(self) -> ViewFeed:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until the socket is open (not for the service: the page says when it connects)."""
        if not self._opened.wait(timeout):
            raise TimeoutError(f"the subscriber on {self.state.endpoint} did not open within {timeout:g} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> ViewFeed:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
