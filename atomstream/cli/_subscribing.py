"""What the subscribing commands (``watch``, ``view``, ``record``) share: CURVE keys from their flags and the scan
file drawn under the maps, each turned into a one-line ``CommandError`` when wrong."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from atomstream.cli import CommandError

__all__ = ["add_subscriber_flags", "subscriber_curve", "underlay_frames"]


def add_subscriber_flags(parser: argparse.ArgumentParser) -> None:
    """``--proxy``, ``--curve-secret`` and ``--curve-server-key``: how every subscribing command reaches the service."""
    parser.add_argument("--proxy", action="store_true", help="several workers behind a proxy: no seq gap tracking")
    parser.add_argument(
        "--curve-secret",
        type=Path,
        default=None,
        help="this client's *.key_secret (default: none, CURVE off)",
    )
    parser.add_argument(
        "--curve-server-key",
        type=Path,
        default=None,
        help="the service's public key (default: none, CURVE off)",
    )


def subscriber_curve(args: argparse.Namespace) -> Any:
    """The client's CURVE keys from ``--curve-secret`` and ``--curve-server-key`` (both or neither), or None."""
    from streamer.wire.security import ClientCurve

    if (args.curve_secret is None) != (args.curve_server_key is None):
        raise CommandError("CURVE needs both --curve-secret (this client's key) and --curve-server-key")
    if args.curve_secret is None:
        return None
    return ClientCurve(client_secret_file=args.curve_secret, server_public_file=args.curve_server_key)


def underlay_frames(path: Path | None) -> Any:
    """The frames of the scan file at ``path`` (to draw the maps over), or None without one."""
    if path is None:
        return None
    from sim.formats import ScanFormatError, read_scan

    try:
        return read_scan(path).frames
    except ScanFormatError as exc:
        raise CommandError(str(exc)) from None
