"""``atomstream replay``: send a recorded or synthetic scan to the streaming service, as a detector would."""

from __future__ import annotations

import argparse
from pathlib import Path

from atomstream.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("replay", help="send a scan file over ZeroMQ PUSH (wire protocol v1)")
    parser.add_argument("path", type=Path, help="scan file: .npy .npz .tif .h5 (.dm3/.dm4/.emd/.ser with [formats])")
    parser.add_argument(
        "--endpoint", default="tcp://127.0.0.1:5555", help="PULL endpoint to connect (or bind) (default: %(default)s)"
    )
    parser.add_argument("--bind", action="store_true", help="bind the PUSH socket instead of connecting")
    parser.add_argument("--fps", type=float, default=None, help="frames per second (default: as fast as possible)")
    parser.add_argument("--loop", type=int, default=1, help="send the scan this many times (default: %(default)s)")
    parser.add_argument("--scan-id", default=None, help="scan id (default: the file's stem)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="array/dataset inside .npz/.h5 (or signal in rsciio files) (default: the only one)",
    )
    parser.add_argument(
        "--hwm", type=int, default=100, help="frames queued before a send blocks (default: %(default)s)"
    )
    parser.add_argument(
        "--send-timeout-ms", type=int, default=10_000, help="give up when no peer takes a frame (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from sim.formats import ScanFormatError, read_scan
    from sim.replay import ReplayError, replay

    if args.loop < 1:
        raise CommandError(f"--loop must be >= 1, got {args.loop}")
    if args.fps is not None and args.fps < 0:
        raise CommandError(f"--fps must be positive (or 0 for as fast as possible), got {args.fps}")
    try:
        scan = read_scan(args.path, dataset=args.dataset)
    except ScanFormatError as exc:
        raise CommandError(str(exc)) from None
    meta = {k: v for k, v in scan.meta.items() if isinstance(v, (str, int, float, type(None)))}
    try:
        summary = replay(
            scan.frames,
            args.endpoint,
            meta=meta,
            bind=args.bind,
            fps=args.fps,
            loop=args.loop,
            scan_id=args.scan_id or args.path.stem,
            hwm=args.hwm,
            send_timeout_ms=args.send_timeout_ms,
            progress=not args.no_progress,
        )
    except (ReplayError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(summary)
    return 130 if summary.interrupted else 0
