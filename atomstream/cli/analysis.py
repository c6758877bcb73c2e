"""``atomstream evaluate`` and ``atomstream plot``: what a trained run makes of data, as numbers and as figures.

Both only read the run: encoding runs without gradients and no optimiser exists here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from atomstream.cli import CommandError
from atomstream.cli._flags import config_flag

__all__ = ["register"]

_ENCODE = "models.evaluate:encode_images"


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("evaluate", help="accuracy, NMI, confusion and latent/factor Spearman of a run")
    ev.add_argument("run", type=Path, help="run directory written by `atomstream train`")
    ev.add_argument("--data", type=Path, required=True, help="data with labels and/or true factors (.npz)")
    ev.add_argument(
        "--factors",
        default=None,
        help="comma-separated factors to match to z (default: all but those γ and s absorb, i.e. angle, shift)",
    )
    config_flag(ev, "--batch-size", type=int, where=_ENCODE, field="batch_size", help="patches per encoder call")
    config_flag(ev, "--device", choices=("cpu", "cuda"), where=_ENCODE, field="device", help="where to encode")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.add_argument(
        "--baseline",
        action="store_true",
        help="also score a trivial method on the same patches (PCA + GMM classes, PCA components as z)",
    )
    ev.set_defaults(func=_evaluate)

    pl = subparsers.add_parser("plot", help="latent traversals, manifolds, conditioned generation, maps")
    pl.add_argument("run", type=Path, help="run directory written by `atomstream train`")
    pl.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data for the confusion matrix and real-space maps (default: none, no such figures)",
    )
    pl.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    pl.add_argument("--steps", type=int, default=9, help="columns of a traversal (default: %(default)s)")
    pl.add_argument("--grid", type=int, default=8, help="side of a per-class manifold grid (default: %(default)s)")
    pl.add_argument("--frame", type=int, default=0, help="frame of a scan to map (default: %(default)s)")
    config_flag(pl, "--batch-size", type=int, where=_ENCODE, field="batch_size", help="patches per encoder call")
    config_flag(pl, "--device", choices=("cpu", "cuda"), where=_ENCODE, field="device", help="where to encode")
    pl.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl.set_defaults(func=_plot)


def _default_factors(factors: dict[str, Any], model_cfg: Any) -> tuple[str, ...]:
    """z should carry what the invariant latents do not: leave out angle (γ) and shift (s) when the model has them."""
    from models.evaluate import factor_columns

    names = []
    for name in factor_columns(factors):
        if model_cfg.rotation and name == "angle":
            continue
        if model_cfg.translation and name.startswith("shift"):
            continue
        names.append(name)
    return tuple(names)


def _evaluate(args: argparse.Namespace) -> int:
    from atomstream.cli._flags import from_config
    from atomstream.cli.train import ENCODE_FLAGS, encode_with_flags, open_run, read_patches
    from models.evaluate import evaluate_encodings

    given = from_config(args, ENCODE_FLAGS)
    model, cfg = open_run(args.run, given.get("device"))
    patches = read_patches(args.data, data_config=cfg.data)
    if args.factors is not None:
        names = tuple(n.strip() for n in args.factors.split(",") if n.strip())
    else:
        names = _default_factors(patches.factors, cfg.model)
    enc = encode_with_flags(model, patches.images, given)
    try:
        result = evaluate_encodings(enc, labels=patches.labels, factors=patches.factors, factor_names=names)
    except ValueError as exc:
        raise CommandError(f"--factors {args.factors}: {exc}") from None
    baseline = None
    if args.baseline:
        from models.baselines import baseline_encodings

        trivial = baseline_encodings(
            patches.images, n_classes=cfg.model.n_classes, latent_dim=cfg.model.latent_dim, seed=cfg.train.seed
        )
        baseline = evaluate_encodings(trivial, labels=patches.labels, factors=patches.factors, factor_names=names)
    if args.json:
        extra = {} if baseline is None else {"baseline": baseline.to_dict()}
        print(json.dumps({"run": str(args.run), "data": str(args.data), **result.to_dict(), **extra}))
        return 0
    print(f"{cfg.model.variant} on {result.n} patches of {args.data}")
    if result.accuracy is not None:
        print(f"accuracy {result.accuracy:.4f}  NMI {result.nmi:.4f}  (clusters matched to labels, Hungarian)")
        print("confusion (rows: true class, columns: matched cluster):")
        names_k = patches.class_names or tuple(str(i) for i in range(result.confusion.shape[0]))
        for i, row in enumerate(result.confusion):
            label = names_k[i] if i < len(names_k) else str(i)
            print(f"  {label:>10s} " + " ".join(f"{int(v):6d}" for v in row))
    elif result.class_counts is not None:
        print("class counts " + " ".join(str(int(c)) for c in result.class_counts) + " (no labels in the data)")
    for factor, (dim, rho) in result.spearman.items():
        print(f"|Spearman| {factor} ~ z{dim}: {rho:.3f}")
    if baseline is not None:
        _print_baseline(result, baseline, cfg.model.n_classes)
    return 0


def _print_baseline(model: Any, baseline: Any, k: int) -> None:
    """The model's figures beside the trivial method's, and a plain warning where the trivial method does better."""
    print(f"baseline on the same patches: PCA + GMM({k}) classes, the first PCA components as z")
    rows = []
    if model.accuracy is not None and baseline.accuracy is not None:
        rows += [("accuracy", model.accuracy, baseline.accuracy), ("NMI", model.nmi, baseline.nmi)]
    for factor, (_, rho) in model.spearman.items():
        if factor in baseline.spearman:
            rows.append((f"|Spearman| {factor}", rho, baseline.spearman[factor][1]))
    print(f"  {'figure':<24s} {'model':>8s} {'baseline':>9s}")
    for name, m, b in rows:
        flag = "  <- the trivial method does better" if b > m + 0.02 else ""
        print(f"  {name:<24s} {m:8.4f} {b:9.4f}{flag}")


def _centres_figure(args: argparse.Namespace, patches: Any, out: Path) -> Path:
    """The atom centres the run's finder picks on frame ``--frame``, drawn on that frame."""
    import numpy as np

    from models.centres_plot import plot_atom_centres
    from models.data import load_frames

    if args.data.suffix.lower() == ".npy":
        frames = load_frames(args.data)
    else:
        from sim.formats import read_scan

        frames = np.asarray(read_scan(args.data).frames).reshape(-1, *patches.frame_shape)
    if not 0 <= args.frame < frames.shape[0]:
        raise CommandError(f"--frame {args.frame}: the scan has frames 0..{frames.shape[0] - 1}")
    sel = patches.positions[:, 0] == args.frame
    return plot_atom_centres(
        frames[args.frame],
        patches.centres[sel],
        out / f"atoms_frame{args.frame}.png",
        title=f"frame {args.frame}:",
        what="unit-cell centres" if patches.data.atom_sublattice == "cells" else "atom centres",
    )


def _plot(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from atomstream.cli._flags import from_config
    from atomstream.cli.train import ENCODE_FLAGS, open_run
    from models import plots

    if args.steps < 2 or args.grid < 2:
        raise CommandError(f"--steps {args.steps} and --grid {args.grid} must be at least 2")
    given = from_config(args, ENCODE_FLAGS)
    model, cfg = open_run(args.run, given.get("device"))
    m = cfg.model
    out = args.out
    # what to draw, decided up front so the bar knows its length; each entry draws and writes one PNG
    tasks: list[tuple[str, Any]] = [
        ("traversals", lambda: plots.plot_traversals(model, m, out / "traversals.png", n_steps=args.steps))
    ]
    if m.latent_dim >= 2:
        tasks.append(("manifolds", lambda: plots.plot_manifolds(model, m, out / "manifolds.png", n=args.grid)))
    if m.decoder != "dense":  # a dense decoder has no coordinates to rotate
        tasks.append(("conditioned", lambda: plots.plot_conditioned(model, m, out / "conditioned.png")))
    if args.data is not None:
        tasks += _data_figures(args, model, cfg, given)
    written = []
    with tqdm(tasks, unit="figure", disable=args.no_progress, leave=False) as bar:
        for name, draw in bar:
            bar.set_description(name)
            written.append(draw())
    for path in written:
        print(path)
    return 0


def _data_figures(args: argparse.Namespace, model: Any, cfg: Any, given: dict[str, Any]) -> list[tuple[str, Any]]:
    """The figures that need ``--data``: a confusion matrix (with labels) and real-space maps (a scan)."""
    from atomstream.cli.train import encode_with_flags, read_patches
    from models import plots
    from models.evaluate import evaluate_encodings

    tasks: list[tuple[str, Any]] = []
    m, out = cfg.model, args.out
    patches = read_patches(args.data, data_config=cfg.data)
    enc = encode_with_flags(model, patches.images, given)
    if patches.labels is not None and "class_prob" in enc:
        result = evaluate_encodings(enc, labels=patches.labels)
        tasks.append(
            (
                "confusion",
                lambda: plots.plot_confusion(result.confusion, out / "confusion.png", class_names=patches.class_names),
            )
        )
    if patches.frame_shape is not None and cfg.data.kind == "atoms":
        tasks.append(("atom centres", lambda: _centres_figure(args, patches, out)))
    if patches.frame_shape is not None:
        sel = patches.positions[:, 0] == args.frame
        if not sel.any():
            n_frames = int(patches.positions[:, 0].max()) + 1
            raise CommandError(f"--frame {args.frame}: the scan has frames 0..{n_frames - 1}")
        tasks.append(
            (
                "maps",
                lambda: plots.plot_real_space_maps(
                    patches.centres[sel],
                    out / f"maps_frame{args.frame}.png",
                    frame_shape=patches.frame_shape,
                    class_prob=enc["class_prob"][sel] if "class_prob" in enc else None,
                    z=enc["z"][sel],
                    angle=enc["angle"][sel] if "angle" in enc else None,
                    grid=patches.grid,
                    class_names=m.names_of_classes() if m.n_classes > 0 else None,
                ),
            )
        )
    return tasks
