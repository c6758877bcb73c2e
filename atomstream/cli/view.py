"""``atomstream view``: the live maps in a web browser (Starlette on uvicorn; ``pip install 'atomstream[view]'``).

A subscriber thread fills a ``ViewState``; the page at the printed address draws the latest frame's class map (over
the frame itself when ``--frame-file`` names the scan being replayed), defect score with the published defects,
rotation angle and the first two latents, class fractions over time, throughput and latency. Once the web server
listens, one line goes to stdout: ``atomstream view: http://HOST:PORT/`` (with ``--port 0`` that is how a script
learns the port). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from atomstream.cli import CommandError
from atomstream.cli._subscribing import add_subscriber_flags

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("view", help="live maps in the browser: classes, defects, latents, rates")
    parser.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5556",
        help="the service's PUB (or a proxy's XPUB) endpoint (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the web page is served on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="web port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--frame-file", type=Path, default=None, help="the scan being replayed, drawn under the classes (default: none)"
    )
    parser.add_argument(
        "--max-fps",
        type=float,
        default=5.0,
        help="page updates per second, at most (default: %(default)s)",
    )
    parser.add_argument("--window", type=float, default=5.0, help="seconds of history for rates (default: %(default)s)")
    parser.add_argument(
        "--history",
        type=int,
        default=300,
        help="frames in the class-fraction chart (default: %(default)s)",
    )
    add_subscriber_flags(parser)
    parser.set_defaults(func=_view)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot serve the page on {host}:{port}: {exc.strerror}; pick another --port") from None
    sock.listen(64)
    return sock


def _view(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from atomstream.view.app import create_app
    except ImportError as exc:
        raise CommandError(f"the view needs {exc.name}: pip install 'atomstream[view]'") from None
    from atomstream.cli._endpoints import checked_endpoint
    from atomstream.cli._subscribing import subscriber_curve, underlay_frames
    from atomstream.view.state import ViewFeed, ViewState

    endpoint = checked_endpoint(args.endpoint, "--endpoint")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be 0..65535, got {args.port}")
    if args.max_fps <= 0 or args.window <= 0 or args.history < 1:
        raise CommandError("--max-fps and --window must be positive and --history at least 1")
    curve = subscriber_curve(args)
    frames = underlay_frames(args.frame_file)

    state = ViewState(endpoint=endpoint, window_s=args.window, history=args.history, frames=frames)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = uvicorn.Server(
        uvicorn.Config(create_app(state, max_fps=args.max_fps), log_level="warning", ws="wsproto", lifespan="off")
    )
    with ViewFeed(state, curve=curve, track_seq=not args.proxy) as feed:
        try:
            feed.wait_ready(10.0)
        except Exception as exc:
            sock.close()
            raise CommandError(str(exc)) from None
        print(f"atomstream view: http://{shown}:{port}/", flush=True)
        server.run(sockets=[sock])
    sys.stdout.flush()
    return 0
