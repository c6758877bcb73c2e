"""``atomstream record``: subscribe to the service and write maps, defects, errors and model identity to HDF5.

The layout is documented in ``atomstream.recorder`` and docs/recording.md. Once subscribed (a heartbeat arrived),
one line goes to stdout, ``recording from ENDPOINT into PATH``, so a script knows when to start the scan. Stops after
``--frames`` maps, ``--scans`` scan summaries, ``--duration`` seconds, or Ctrl-C; the file is closed cleanly each time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from atomstream.cli import CommandError
from atomstream.cli._subscribing import add_subscriber_flags

__all__ = ["register"]

_TOPICS = ("maps", "defects", "error", "scan_summary")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("record", help="write the published maps and defects to an HDF5 file")
    parser.add_argument("output", type=Path, help="HDF5 file to write (.h5)")
    parser.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5556",
        help="the service's PUB (or proxy XPUB) endpoint (default: %(default)s)",
    )
    parser.add_argument("--frames", type=int, default=None, help="stop after this many maps (default: no limit)")
    parser.add_argument(
        "--scans",
        type=int,
        default=None,
        help="stop after this many scans have ended (default: no limit)",
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: no limit)")
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="artifact directory: its manifest goes in the file (default: none)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the service (default: %(default)s)",
    )
    add_subscriber_flags(parser)
    parser.set_defaults(func=_record)


def _manifest(artifact: Path | None) -> tuple[dict | None, str | None]:
    """The manifest of ``--artifact`` and its sha256 as stored (the model identity the service publishes)."""
    if artifact is None:
        return None, None
    path = artifact / "manifest.json" if artifact.is_dir() else artifact
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise CommandError(f"--artifact {artifact}: cannot read its manifest.json ({exc})") from None
    if not isinstance(data, dict):
        raise CommandError(f"--artifact {artifact}: manifest.json is not a JSON object")
    return data, hashlib.sha256(raw).hexdigest()


def _record(args: argparse.Namespace) -> int:
    from atomstream.cli._endpoints import checked_endpoint
    from atomstream.cli._subscribing import subscriber_curve
    from atomstream.recorder import Recorder, RecorderError
    from streamer.wire.client import Subscriber

    endpoint = checked_endpoint(args.endpoint, "--endpoint")
    for flag, value in (("--frames", args.frames), ("--scans", args.scans)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be >= 1, got {value}")
    if args.duration is not None and args.duration <= 0:
        raise CommandError(f"--duration must be positive, got {args.duration}")
    curve = subscriber_curve(args)
    manifest, identity = _manifest(args.artifact)
    try:
        recorder = Recorder(
            args.output, endpoint=endpoint, overwrite=args.force, manifest=manifest, manifest_sha256=identity
        )
    except RecorderError as exc:
        raise CommandError(str(exc)) from None
    interrupted = False
    with recorder, Subscriber(endpoint, _TOPICS, curve=curve, rcvtimeo_ms=200, track_seq=not args.proxy) as sub:
        try:
            try:
                sub.wait_connected(args.connect_timeout)
            except TimeoutError as exc:
                raise CommandError(str(exc)) from None
            print(f"recording from {endpoint} into {args.output}", flush=True)
            end = None if args.duration is None else time.monotonic() + args.duration
            while end is None or time.monotonic() < end:
                try:
                    got = sub.recv(0.2)
                except TimeoutError:
                    continue
                recorder.add(got)
                if args.frames is not None and recorder.frames >= args.frames:
                    break
                if args.scans is not None and recorder.summaries >= args.scans:
                    break
        except KeyboardInterrupt:
            interrupted = True
        missing = sum(sub.stats.missing.values())
    print(
        f"recorded {recorder.frames} frame(s), {recorder.defects} defect(s), {recorder.errors} error(s) "
        f"into {args.output}" + (f"; {missing} message(s) lost on the way (seq gaps)" if missing else ""),
        flush=True,
    )
    if recorder.unmatched_manifest:
        print(
            f"warning: the served model is not the one in {args.artifact}; its manifest was not stored", file=sys.stderr
        )
    return 130 if interrupted else 0
