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
from atomstream.cli._flags import config_flag

__all__ = ["register"]

_READY_TIMEOUT_S = 300.0


def _port(text: str) -> int | None:
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0: a free port; none: no metrics)") from None


_SERVICE = "streamer.service.config:ServiceConfig"


def _defect_classes(text: str) -> list[int | str]:
    """``"dopant,3"`` -> ``["dopant", 3]``: class names or indices."""
    return [int(c) if c.isdigit() else c for c in (c.strip() for c in text.split(",")) if c]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Each flag is one ``ServiceConfig`` field of the same name, with its default shown from the model."""
    parser = subparsers.add_parser("serve", help="run the streaming service: frames in over ZeroMQ, maps out")
    parser.add_argument("--config", type=Path, default=None, help="YAML file with ServiceConfig fields (default: none)")

    def field(flag: str, help: str, **kwargs: Any) -> None:
        config_flag(parser, flag, where=_SERVICE, field=flag[2:].replace("-", "_"), help=help, **kwargs)

    field("--artifact", "exported artifact directory", type=Path)
    field("--ingest", "PULL endpoint to bind")
    field("--publish", "PUB endpoint to bind")
    field("--publish-connect", "connect --publish (a proxy's XSUB endpoint) instead of binding it", action="store_true")
    field("--publish-reliable", "extra XPUB endpoint that never drops (back-pressure)")
    field("--control", "REP endpoint to bind")
    field("--metrics-host", "HTTP host for /metrics")
    config_flag(  # "none" is a value (off), so absent means not given
        parser,
        "--metrics-port",
        type=_port,
        default=argparse.SUPPRESS,
        where=_SERVICE,
        field="metrics_port",
        help="0: a free port; none: off",
    )
    field("--backend", "which encoder file to run", choices=("onnx", "torchscript"))
    field("--device", "where to encode", choices=("auto", "cpu", "cuda"))
    field("--intra-op-threads", "ONNX Runtime CPU threads (none: up to 4)", type=int)
    field("--max-batch-patches", "most patches per encoder call", type=int)
    config_flag(
        parser,
        "--no-frame-encoder",
        dest="frame_encoder",
        action="store_false",
        where=_SERVICE,
        field="frame_encoder",
        help="cut every grid frame into its patches instead of encoding it whole with the artifact's "
        "encoder.frame.onnx",
        shown=lambda whole: "encode whole where the artifact can" if whole else "cut",
    )
    field("--max-wait-ms", "how long a partial batch waits", type=float)
    field("--queue-size", "frames waiting for the encoder, at most", type=int)
    field("--overload", "a full queue blocks ingest or drops the oldest frame", choices=("block", "drop_oldest"))
    field("--defect-classes", "comma-separated class names or indices (none: the manifest's)", type=_defect_classes)
    field("--defect-threshold", "defect score threshold in [0, 1]", type=float)
    field("--status-interval-s", "seconds between heartbeats", type=float)
    field(
        "--insecure",
        "allow binding beyond loopback without CURVE (anyone who can connect may inject frames and reload)",
        action="store_true",
    )
    config_flag(  # repeatable: one directory per flag
        parser,
        "--artifact-root",
        dest="artifact_roots",
        action="append",
        type=Path,
        where=_SERVICE,
        field="artifact_roots",
        help="a directory reload may load artifacts from, repeatable (null: the directory holding --artifact)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="(default: %(default)s)"
    )
    parser.set_defaults(func=_serve)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServiceConfig`` fields given as flags: every namespace entry named like a field and not None
    (``metrics_port`` is present only when given, and then may be None: off)."""
    from streamer.service.config import ServiceConfig

    given = vars(args)
    return {
        name: given[name]
        for name in ServiceConfig.model_fields
        if name in given and (given[name] is not None or name == "metrics_port")
    }


def _ready_line(service: Any) -> dict[str, Any]:
    return {
        "event": "ready",
        "ingest": service.ingest_endpoint,
        "publish": service.publish_endpoint,
        "control": service.control_endpoint,
        "publish_reliable": service.publish_reliable_endpoint,
        "metrics": service.metrics_url,
        "model": service.model.model_dump() if service.model is not None else None,
        "encoder": service.encoder,
    }


def _serve(args: argparse.Namespace) -> int:
    from streamer.service.config import ConfigError, ServiceConfig
    from streamer.service.facade import Service, ServiceError

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
