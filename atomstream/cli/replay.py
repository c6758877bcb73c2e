"""``atomstream replay``: send a recorded or synthetic scan to the streaming service, as a detector would.

A PUSH socket only knows that a frame left, so before sending, replay subscribes to the service's ``error`` and
``scan_summary`` topics (``--publish``, the PUB endpoint) and afterwards reports what the service did with the frames:
published, rejected with the reasons, dropped. It exits 1 when any frame was rejected or dropped. Where the service
cannot be heard (no heartbeat on ``--publish`` within a few seconds), it says so and sends anyway; ``--no-feedback``
skips the subscription (several workers behind a proxy, or a service publishing elsewhere).

Ctrl-C finishes the frame being sent and closes the scan; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from atomstream.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("replay", help="send a scan file over ZeroMQ PUSH and report what the service did")
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
    parser.add_argument(
        "--publish",
        default="tcp://127.0.0.1:5556",
        help="the service's PUB endpoint, for its verdict (default: %(default)s)",
    )
    parser.add_argument("--no-feedback", action="store_true", help="do not wait for the service's scan summary")
    parser.add_argument(
        "--feedback-timeout", type=float, default=30.0, help="seconds to wait for the summaries (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from atomstream.cli._endpoints import checked_endpoint
    from atomstream.cli._interrupt import first_sigint_sets
    from sim.feedback import ServiceFeedback
    from sim.formats import ScanFormatError, read_scan
    from sim.replay import ReplayError, replay

    endpoint = checked_endpoint(args.endpoint, "--endpoint")
    publish = None if args.no_feedback else checked_endpoint(args.publish, "--publish")
    if args.loop < 1:
        raise CommandError(f"--loop must be >= 1, got {args.loop}")
    if args.fps is not None and args.fps < 0:
        raise CommandError(f"--fps must be positive (or 0 for as fast as possible), got {args.fps}")
    try:
        scan = read_scan(args.path, dataset=args.dataset)
    except ScanFormatError as exc:
        raise CommandError(str(exc)) from None
    if scan.meta.get("converted"):
        print(f"atomstream replay: note: {args.path}: {scan.meta['converted']}", file=sys.stderr)
    meta = {k: v for k, v in scan.meta.items() if isinstance(v, (str, int, float, type(None)))}
    feedback = None
    if publish is not None:
        try:
            feedback = ServiceFeedback(publish).start()
        except TimeoutError:
            print(
                f"atomstream replay: warning: no heartbeat from the service on --publish {publish}; sending anyway, "
                "but what it makes of the frames cannot be reported (give its PUB endpoint, or --no-feedback)",
                file=sys.stderr,
            )
    try:
        with first_sigint_sets(threading.Event()) as stop:
            summary = replay(
                scan.frames,
                endpoint,
                meta=meta,
                bind=args.bind,
                fps=args.fps,
                loop=args.loop,
                scan_id=args.scan_id or args.path.stem,
                hwm=args.hwm,
                send_timeout_ms=args.send_timeout_ms,
                progress=not args.no_progress,
                stop=stop,
            )
        print(summary)
        if feedback is None:
            return 130 if summary.interrupted else 0
        outcomes = feedback.collect(summary.scan_ids, timeout=args.feedback_timeout)
    except (ReplayError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if feedback is not None:
            feedback.close()
    for outcome in outcomes.values():
        print("\n".join(outcome.lines()))
    if feedback.unattributed:
        print(f"errors naming no scan (unreadable headers): {dict(feedback.unattributed)}")
    if summary.interrupted:
        return 130
    return 0 if all(o.ok for o in outcomes.values()) else 1
