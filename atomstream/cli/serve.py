"""``atomstream serve``: run the streaming service until SIGTERM or Ctrl-C, then drain and exit 0.

Options become a ``ServiceConfig`` here, at the edge: flags override ``ATOMSTREAM_…`` environment variables, which
override the ``--config`` YAML file. Once ready, one JSON line goes to stdout with the bound endpoints (``{"event":
"ready", ...}``) — with port 0 in an endpoint that is how a supervisor or a test learns the actual port — and one
``{"event": "stopped", ...}`` line with the final counts after the drain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from atomstream.cli import CommandError

__all__ = ["register"]

_READY_TIMEOUT_S = 300.0


def _port(text: str) -> int | None:
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0: a free port; none: no metrics)") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the streaming service: frames in over ZeroMQ, maps out")
    parser.add_argument("--artifact", type=Path, default=None, help="exported artifact directory")
    parser.add_argument("--config", type=Path, default=None, help="YAML file with ServiceConfig fields")
    parser.add_argument("--ingest", default=None, help="PULL endpoint to bind (default tcp://127.0.0.1:5555)")
    parser.add_argument("--publish", default=None, help="PUB endpoint to bind (default tcp://127.0.0.1:5556)")
    parser.add_argument(
        "--publish-connect",
        action="store_true",
        default=None,
        help="connect --publish (a proxy's XSUB endpoint) instead of binding it",
    )
    parser.add_argument("--publish-reliable", default=None, help="extra XPUB endpoint that never drops (back-pressure)")
    parser.add_argument("--control", default=None, help="REP endpoint to bind (default tcp://127.0.0.1:5557)")
    parser.add_argument("--metrics-host", default=None, help="HTTP host for /metrics (default 127.0.0.1)")
    parser.add_argument("--metrics-port", type=_port, default=argparse.SUPPRESS, help="0: free port; none: off")
    parser.add_argument("--backend", choices=("onnx", "torchscript"), default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument("--max-batch-patches", type=int, default=None, help="most patches per encoder call")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="how long a partial batch waits")
    parser.add_argument("--queue-size", type=int, default=None, help="frames waiting for the encoder, at most")
    parser.add_argument("--overload", choices=("block", "drop_oldest"), default=None)
    parser.add_argument("--defect-classes", default=None, help="comma-separated class names or indices")
    parser.add_argument("--defect-threshold", type=float, default=None, help="defect score threshold in [0, 1]")
    parser.add_argument("--status-interval-s", type=float, default=None, help="seconds between heartbeats")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(func=_serve)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "artifact",
        "ingest",
        "publish",
        "publish_connect",
        "publish_reliable",
        "control",
        "metrics_host",
        "backend",
        "device",
        "max_batch_patches",
        "max_wait_ms",
        "queue_size",
        "overload",
        "defect_threshold",
        "status_interval_s",
    )
    out: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if hasattr(args, "metrics_port"):  # given on the command line, possibly as "none"
        out["metrics_port"] = args.metrics_port
    if args.defect_classes is not None:
        items = [c.strip() for c in args.defect_classes.split(",") if c.strip()]
        out["defect_classes"] = [int(c) if c.isdigit() else c for c in items]
    return out


def _ready_line(service: Any) -> dict[str, Any]:
    return {
        "event": "ready",
        "ingest": service.ingest_endpoint,
        "publish": service.publish_endpoint,
        "control": service.control_endpoint,
        "publish_reliable": service.publish_reliable_endpoint,
        "metrics": service.metrics_url,
        "model": service.model.model_dump() if service.model is not None else None,
    }


def _serve(args: argparse.Namespace) -> int:
    from streamer.config import ConfigError, ServiceConfig
    from streamer.service import Service, ServiceError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = ServiceConfig.load(config_file=args.config, overrides=_overrides(args))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if cfg.artifact is None:
        raise CommandError("no artifact: give --artifact DIR (or 'artifact:' in --config, or ATOMSTREAM_ARTIFACT)")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: give up on the drain
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    service = Service(cfg)
    ready = False
    try:
        service.start()
        service.wait_ready(_READY_TIMEOUT_S)
        ready = True
        print(json.dumps(_ready_line(service)), flush=True)
        while not stop.wait(0.25):
            service.check()
        service.stop()
    except (ServiceError, TimeoutError) as exc:
        with contextlib.suppress(ServiceError):  # the same failure, already in hand
            service.stop()
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        if not ready:  # a bad artifact, a port in use: the user's to fix
            raise CommandError(str(cause)) from None
        print(f"atomstream serve: error: {cause}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"event": "stopped", **service.counts}), flush=True)
    return 0
