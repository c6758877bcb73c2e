"""``atomstream synth cards|lattice``: write synthetic data sets with their ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atomstream.cli import CommandError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("synth", help="write synthetic data (cards, lattice scans) with ground truth")
    sub = parser.add_subparsers(dest="synth_kind", metavar="KIND", required=True)

    cards = sub.add_parser("cards", help="the paper's cards data set as .npz")
    cards.add_argument("--n", type=int, default=3000, help="number of images (default 3000)")
    cards.add_argument("--size", type=int, default=48, help="image side in pixels (default 48)")
    cards.add_argument("--rotation", type=float, default=60.0, help="angle ~ U(-R, R) degrees (default 60)")
    cards.add_argument("--shear", type=float, default=10.0, help="shear ~ U(-S, S) degrees (default 10)")
    cards.add_argument(
        "--max-shift", type=float, default=0.1, help="shift up to this fraction of the image (default: %(default)s)"
    )
    cards.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    cards.add_argument("--out", type=Path, required=True, help="output .npz")
    cards.set_defaults(func=_cards)

    lat = sub.add_parser("lattice", help="a scan of atomic columns (.npy) plus <stem>.truth.npz")
    lat.add_argument("--size", type=int, default=512, help="frame side in pixels (default 512)")
    lat.add_argument("--frames", type=int, default=1, help="number of frames (default 1)")
    lat.add_argument("--kind", choices=("square", "hexagonal"), default="square", help="lattice (default: %(default)s)")
    lat.add_argument("--lattice-constant", type=float, default=None, help="px (default 16 square, 12 hexagonal)")
    lat.add_argument("--sigma", type=float, default=None, help="column σ, px (default 2 square, 1.6 hexagonal)")
    lat.add_argument("--defects", type=int, default=10, help="number of point defects (default 10)")
    lat.add_argument(
        "--interface",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="film over substrate (default on for square, off for hexagonal)",
    )
    lat.add_argument(
        "--ripples",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="STM-like interference around defects (default on for hexagonal)",
    )
    lat.add_argument("--noise", action=argparse.BooleanOptionalAction, default=True, help="shot noise (default: on)")
    lat.add_argument(
        "--dtype", choices=("float32", "uint16"), default="float32", help="pixel type (default: %(default)s)"
    )
    lat.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    lat.add_argument("--out", type=Path, required=True, help="output .npy (frames N×H×W)")
    lat.set_defaults(func=_lattice)


def _cards(args: argparse.Namespace) -> int:
    from sim.cards import make_cards, save_npz

    if args.out.suffix != ".npz":
        raise CommandError(f"--out {args.out}: the cards set is written as .npz; use a .npz name")
    if args.n < 1 or args.size < 8:
        raise CommandError(f"need --n >= 1 and --size >= 8; got --n {args.n} --size {args.size}")
    try:
        cards = make_cards(
            args.n, size=args.size, rotation=args.rotation, shear=args.shear, max_shift=args.max_shift, seed=args.seed
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(args.out, cards)
    print(f"wrote {len(cards)} cards {args.size}x{args.size} (rotation ±{args.rotation}°) to {args.out}")
    return 0


def _lattice(args: argparse.Namespace) -> int:
    import numpy as np
    from pydantic import ValidationError

    from sim.lattice import LatticeConfig, stack_truths, synth_scan

    if args.out.suffix != ".npy":
        raise CommandError(f"--out {args.out}: frames are written as .npy; use a .npy name")
    if args.frames < 1:
        raise CommandError(f"--frames must be >= 1, got {args.frames}")
    hexagonal = args.kind == "hexagonal"
    try:
        cfg = LatticeConfig(
            shape=(args.size, args.size),
            kind=args.kind,
            lattice_constant=args.lattice_constant or (12.0 if hexagonal else 16.0),
            column_sigma=args.sigma or (1.6 if hexagonal else 2.0),
            n_defects=args.defects,
            interface=(not hexagonal) if args.interface is None else args.interface,
            ripples=hexagonal if args.ripples is None else args.ripples,
            noise=args.noise,
            dtype=args.dtype,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CommandError(f"bad option {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    frames, truths = synth_scan(cfg, args.frames, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, frames)
    truth_path = args.out.with_name(args.out.stem + ".truth.npz")
    np.savez_compressed(truth_path, config=np.array(json.dumps(cfg.model_dump(mode="json"))), **stack_truths(truths))
    print(f"wrote {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} {frames.dtype} to {args.out}")
    print(f"wrote ground truth to {truth_path}")
    return 0
