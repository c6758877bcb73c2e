"""`atomstream demo`: the whole loop on a synthetic scan, in one command (see ``atomstream.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from atomstream.demo import DemoOptions

    d = DemoOptions()
    parser = sub.add_parser("demo", help="synthesise a scan, train, export, serve, replay and report (a few minutes)")
    parser.add_argument("--out", type=Path, default=d.out, help=f"output folder (default: {d.out})")
    parser.add_argument("--size", type=int, default=d.size, help="frame side in pixels (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=d.frames, help="frames in the scan (default: %(default)s)")
    parser.add_argument(
        "--train-frames", type=int, default=d.train_frames, help="frames used for training (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=d.classes, help="K classes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of scan and training (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from atomstream.cli import CommandError
    from atomstream.demo import DemoOptions, run_demo

    if not 0 < args.train_frames < args.frames:
        raise CommandError(f"--train-frames {args.train_frames} must be between 1 and --frames - 1 ({args.frames - 1})")
    if args.size < 64:
        raise CommandError(f"--size {args.size} is too small for the demo's lattice; use at least 64")
    opts = DemoOptions(
        out=args.out, size=args.size, frames=args.frames, train_frames=args.train_frames, epochs=args.epochs,
        classes=args.classes, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    run_demo(opts)
    return 0
