"""``atomstream watch``: a live table of what the service publishes, and optional PNG overlays of the maps.

The table refreshes in place on a terminal and falls back to plain printed blocks when stdout is not a TTY (a log,
a pipe, CI). Rates and latency percentiles are over the last ``--window`` seconds of ``maps``; class fractions and
defects per frame over the same window; errors and seq gaps since start. Latencies: *service* is
``t_pub - t_recv`` (inside the service), *end to end* is ``t_pub - t_acq`` (needs the producer's ``t_acq_ns``).

The frame itself is not on the wire, so a PNG draws the maps on the frame's pixel grid from the header's patch
geometry (each grid cell centred on its patch), over the frame from ``--frame-file`` when one is given.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from atomstream.cli import CommandError
from atomstream.cli._subscribing import add_subscriber_flags

__all__ = ["WatchTable", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("watch", help="live table of the published maps (frames/s, latency, classes)")
    parser.add_argument(
        "--endpoint", default="tcp://127.0.0.1:5556", help="PUB (or proxy XPUB) endpoint (default: %(default)s)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    parser.add_argument("--frames", type=int, default=None, help="stop after this many maps (default: no limit)")
    parser.add_argument(
        "--png-dir", type=Path, default=None, help="save class/defect overlays here as PNG (default: none)"
    )
    parser.add_argument("--png-every", type=int, default=1, help="save every Nth frame's maps (default 1)")
    parser.add_argument(
        "--frame-file", type=Path, default=None, help="scan file to draw under the maps (default: none)"
    )
    parser.add_argument("--window", type=float, default=5.0, help="seconds of history for rates (default 5)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between table refreshes (default: %(default)s)"
    )
    add_subscriber_flags(parser)
    parser.set_defaults(func=_watch)


def _pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):8.2f}" if values else "       -"


class WatchTable:
    """Windowed figures from received messages; ``lines()`` renders them."""

    def __init__(self, *, window_s: float) -> None:
        self.window_s = window_s
        self.maps: collections.deque[tuple[float, float, float | None, np.ndarray | None, int]] = collections.deque()
        self.defects_by_frame: dict[tuple[str, int], int] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.class_names: list[str] = []
        self.n_maps = 0
        self.last_status: Any = None
        self.t0 = time.monotonic()

    def add(self, received: Any) -> None:
        msg, now = received.msg, time.monotonic()
        if received.topic == "maps":
            self.n_maps += 1
            self.class_names = list(msg.class_names)
            service_ms = (msg.t_pub_ns - msg.t_recv_ns) / 1e6
            e2e_ms = (msg.t_pub_ns - msg.t_acq_ns) / 1e6 if msg.t_acq_ns is not None else None
            cls = received.arrays.get("class")
            counts = np.bincount(cls.reshape(-1), minlength=msg.n_classes) if cls is not None else None
            self.maps.append((now, service_ms, e2e_ms, counts, int(cls.size) if cls is not None else 0))
        elif received.topic == "defects":
            self.defects_by_frame[(msg.scan_id, msg.frame_id)] = len(msg.defects)
            while len(self.defects_by_frame) > 10_000:
                self.defects_by_frame.pop(next(iter(self.defects_by_frame)))
        elif received.topic == "error":
            self.errors[msg.reason] += 1
        elif received.topic == "status":
            self.last_status = msg
        while self.maps and self.maps[0][0] < now - self.window_s:
            self.maps.popleft()

    def window(self) -> tuple[float, list[float], list[float], np.ndarray | None, float]:
        """Over the last ``window_s``: frames/s, service and end-to-end latencies (ms), class fractions, defects/frame.

        ``atomstream view`` shows the same figures in the browser, so both read them from here.
        """
        span = min(self.window_s, max(time.monotonic() - self.t0, 1e-9))
        service = [m[1] for m in self.maps]
        e2e = [m[2] for m in self.maps if m[2] is not None]
        counts = [m[3] for m in self.maps if m[3] is not None]
        fractions = None
        if counts:
            total = np.sum(counts, axis=0)
            fractions = total / max(int(total.sum()), 1)
        recent = list(self.defects_by_frame.values())[-max(len(self.maps), 1) :]
        return len(self.maps) / span, service, e2e, fractions, float(np.mean(recent)) if recent else 0.0

    def lines(self, stats: Any) -> list[str]:
        fps, service, e2e, fractions, defects_per_frame = self.window()
        out = [
            f"maps {self.n_maps:>8d}   frames/s {fps:8.1f}   (last {self.window_s:g} s)",
            "latency ms        p50      p90      p99      max",
            f"  service    {_pct(service, 50)} {_pct(service, 90)} {_pct(service, 99)} {_pct(service, 100)}",
            f"  end to end {_pct(e2e, 50)} {_pct(e2e, 90)} {_pct(e2e, 99)} {_pct(e2e, 100)}",
        ]
        if fractions is not None:
            names = self.class_names or [str(i) for i in range(len(fractions))]
            out.append("classes    " + "  ".join(f"{n}={f:.1%}" for n, f in zip(names, fractions, strict=False)))
        out.append(f"defects/frame {defects_per_frame:6.2f}")
        errors = ", ".join(f"{r}={n}" for r, n in sorted(self.errors.items())) or "none"
        out.append(f"errors     {errors}")
        out.append(
            f"seq gaps   {stats.n_gaps} ({sum(stats.missing.values())} messages missing)   "
            f"restarts {stats.n_restarts}   undecodable {stats.bad_messages}"
        )
        if self.last_status is not None:
            s = self.last_status
            out.append(
                f"service    in={s.frames_received} out={s.frames_published} rejected={s.frames_rejected} "
                f"dropped={s.frames_dropped} queue={s.queue_depth} {s.backend}/{s.device} up {s.uptime_s:.0f} s"
            )
        return out


def _save_png(received: Any, defects: list[Any], frame: np.ndarray | None, out_dir: Path) -> Path:
    """Class map (categorical, legend) and defect score (colour bar, published defects circled) on the frame's pixel
    grid, cells centred on their patches; over the frame when one is given."""
    from matplotlib.figure import Figure

    from models.map_figures import draw_class_map, draw_scalar_map, grid_extent, save_figure

    msg, arrays = received.msg, received.arrays
    fig = Figure(figsize=(10, 5.4), layout="constrained")
    axes = fig.subplots(1, 2)
    names = list(msg.class_names) or [f"class {k}" for k in range(msg.n_classes)]
    grid = msg.layout == "grid" and "class" in arrays and arrays["class"].ndim >= 2
    where: dict[str, Any] = {}
    if grid:
        where["extent"] = grid_extent(arrays["class"].shape[:2], msg.patch, msg.stride, msg.origin)
    elif "centers" in arrays:
        where["centres"] = arrays["centers"]
    for ax in axes:
        if frame is not None:
            ax.imshow(frame, cmap="gray")
    if "class" in arrays and where:
        draw_class_map(axes[0], arrays["class"], names, alpha=0.5 if frame is not None else 1.0, **where)
    if "defect_score" in arrays and where:
        draw_scalar_map(fig, axes[1], arrays["defect_score"], "defect_score", **where)
    if defects:
        axes[1].scatter([d.x for d in defects], [d.y for d in defects], s=90, facecolors="none", edgecolors="cyan")
    for ax, title in zip(axes, ("classes", f"defect score, {len(defects)} published defect(s) ○"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if frame is None and "centres" in where:
            ax.invert_yaxis()
            ax.set_aspect("equal")
    fig.suptitle(f"scan {msg.scan_id}, frame {msg.frame_id}", fontsize=10)
    return save_figure(fig, out_dir / f"{msg.scan_id}_{msg.frame_id:06d}.png", dpi=80)


def _render(lines: list[str], stream: TextIO, *, tty: bool, previous: int) -> int:
    if tty:
        if previous:
            stream.write(f"\x1b[{previous}F\x1b[J")
        stream.write("\n".join(lines) + "\n")
    else:
        stream.write("\n".join(lines) + "\n\n")
    stream.flush()
    return len(lines)


def _watch(args: argparse.Namespace) -> int:
    from atomstream.cli._endpoints import checked_endpoint
    from atomstream.cli._subscribing import subscriber_curve, underlay_frames
    from streamer.wire.client import Subscriber

    args.endpoint = checked_endpoint(args.endpoint, "--endpoint")
    if args.frames is not None and args.frames < 1:
        raise CommandError(f"--frames must be >= 1, got {args.frames}")
    if args.duration is not None and args.duration <= 0:
        raise CommandError(f"--duration must be positive, got {args.duration}")
    if args.png_every < 1:
        raise CommandError(f"--png-every must be >= 1, got {args.png_every}")
    curve = subscriber_curve(args)
    frames = underlay_frames(args.frame_file)
    if args.png_dir is not None:
        try:
            import matplotlib  # noqa: F401 — checked here so a missing one is a one-line error, not a traceback
        except ImportError:
            raise CommandError("--png-dir needs matplotlib: pip install matplotlib (or 'atomstream[train]')") from None
        args.png_dir.mkdir(parents=True, exist_ok=True)

    table = WatchTable(window_s=args.window)
    tty = sys.stdout.isatty()
    shown = 0
    pending_png: dict[tuple[str, int], Any] = {}
    saved = 0
    end = None if args.duration is None else time.monotonic() + args.duration
    next_draw = time.monotonic() + args.interval
    with Subscriber(args.endpoint, curve=curve, rcvtimeo_ms=200, track_seq=not args.proxy) as sub:
        try:
            while end is None or time.monotonic() < end:
                try:
                    got = sub.recv(0.2)
                except TimeoutError:
                    got = None
                if got is not None:
                    table.add(got)
                    key = (getattr(got.msg, "scan_id", None), getattr(got.msg, "frame_id", None))
                    drawing = args.png_dir is not None
                    if drawing and got.topic == "maps" and (table.n_maps - 1) % args.png_every == 0:
                        pending_png[key] = got
                    elif drawing and got.topic == "defects" and key in pending_png:
                        maps = pending_png.pop(key)
                        frame = frames[maps.msg.frame_id % len(frames)] if frames is not None else None
                        _save_png(maps, list(got.msg.defects), frame, args.png_dir)
                        saved += 1
                    if args.frames is not None and table.n_maps >= args.frames and not pending_png:
                        break
                if time.monotonic() >= next_draw:
                    shown = _render(table.lines(sub.stats), sys.stdout, tty=tty, previous=shown)
                    next_draw = time.monotonic() + args.interval
        except KeyboardInterrupt:
            pass
        _render(table.lines(sub.stats), sys.stdout, tty=tty, previous=shown)
    if args.png_dir is not None:
        print(f"saved {saved} PNG file(s) in {args.png_dir}")
    return 0
