"""``atomstream proxy``: the XSUB/XPUB fan-in that several ``atomstream serve`` workers publish into.

Prints one JSON line with the bound endpoints once ready (``{"event": "ready", "xsub": ..., "xpub": ...}``), then
forwards until SIGTERM, Ctrl-C or ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
from types import FrameType

from atomstream.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("proxy", help="XSUB/XPUB proxy: many workers publish, subscribers read one endpoint")
    parser.add_argument("--xsub", default="tcp://127.0.0.1:5560", help="bind for workers' PUB (default :5560)")
    parser.add_argument("--xpub", default="tcp://127.0.0.1:5561", help="bind for subscribers (default :5561)")
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="also connect to a worker's bound PUB endpoint (repeatable; default: none)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: run until stopped)"
    )
    parser.set_defaults(func=_proxy)


def _proxy(args: argparse.Namespace) -> int:
    from streamer.proxy import Proxy, ProxyError

    if args.duration is not None and args.duration <= 0:
        raise CommandError(f"--duration must be positive, got {args.duration}")
    stop = threading.Event()
    previous = None
    on_main = threading.current_thread() is threading.main_thread()

    def _on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if on_main:
        previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        with Proxy(args.xsub, args.xpub, upstream=args.upstream) as proxy:
            print(json.dumps({"event": "ready", "xsub": proxy.xsub_endpoint, "xpub": proxy.xpub_endpoint}), flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait(args.duration)
    except ProxyError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps({"event": "stopped"}), flush=True)
    return 0
