"""``atomstream train`` and ``atomstream encode``: fit a model on a stack or scan, and encode data with a fitted run.

Options become a frozen ``RunConfig`` here, at the edge, and nowhere else. Scans in any format go through
``sim.formats.read_scan`` (the CLI is the only place allowed to reach across packages); the patches are cut by
``models.data`` with the serving code's preprocessing. The helpers ``read_patches`` and ``open_run`` are shared with
``atomstream.cli.analysis``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from atomstream.cli import CommandError

__all__ = ["open_run", "read_patches", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser("train", help="train a (j)(t)(r)VAE on an image stack (.npz) or a scan")
    data = tr.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help=".npz stack (images N×H×W) or a scan (.npy, .tif, ...)")
    data.add_argument("--patch", type=int, default=None, help="patch side in pixels for scans (default 32)")
    data.add_argument("--stride", type=int, default=None, help="grid stride for scans (default patch // 4)")
    data.add_argument("--fft", action="store_true", help="use each patch's centred log-magnitude spectrum")
    data.add_argument("--atoms", action="store_true", help="cut patches centred on atoms instead of on a grid")
    data.add_argument("--atom-sigma", type=float, default=1.5, help="smoothing σ of the atom finder, px")
    data.add_argument("--atom-min-distance", type=int, default=5, help="smallest atom separation, px")
    data.add_argument("--atom-threshold", type=float, default=0.2, help="relative peak threshold in [0, 1]")
    data.add_argument(
        "--atom-sublattice",
        choices=("brightest", "all"),
        default="brightest",
        help="brightest (default): centre patches on one sublattice, so classes do not split by sublattice",
    )
    model = tr.add_argument_group("model")
    model.add_argument("--classes", type=int, default=4, help="K, number of classes (0: no class latent)")
    model.add_argument("--latent", type=int, default=2, help="dimension of the continuous latent z")
    model.add_argument("--no-rotation", action="store_true", help="drop the rotation latent γ")
    model.add_argument("--no-translation", action="store_true", help="drop the translation latent s")
    model.add_argument("--hidden", type=int, default=256, help="width of every hidden layer (default 256)")
    model.add_argument("--encoder-hidden", type=_widths, default=None, help="encoder widths, e.g. 256,256")
    model.add_argument("--decoder-hidden", type=_widths, default=None, help="decoder widths, e.g. 256,256,256")
    model.add_argument("--encoder", choices=("mlp", "conv"), default="mlp")
    model.add_argument("--decoder", choices=("mlp", "spatial_broadcast", "dense"), default="mlp")
    model.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli")
    model.add_argument(
        "--gaussian-scale",
        type=float,
        default=None,
        help="σ of the Gaussian likelihood (default 0.2; smaller σ risks class collapse)",
    )
    opt = tr.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=100)
    opt.add_argument("--batch-size", type=int, default=128)
    opt.add_argument("--lr", type=float, default=1e-3)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--beta2-start", type=float, default=None, help="β2 on z at the start of annealing (default 8)")
    opt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    opt.add_argument("--val-fraction", type=float, default=0.1, help="share of the data held out for validation")
    opt.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--name", default="jtrvae", help="model name recorded in the run (and the exported artifact)")
    tr.add_argument("--out", type=Path, required=True, help="run directory to write (config.json, weights)")
    tr.set_defaults(func=_train)

    enc = subparsers.add_parser("encode", help="encode data with a trained run into an .npz of latents")
    enc.add_argument("run", type=Path, help="run directory written by `atomstream train`")
    enc.add_argument("--data", type=Path, required=True, help="data cut like the run's training data")
    enc.add_argument("--out", type=Path, required=True, help="output .npz")
    enc.add_argument("--batch-size", type=int, default=512)
    enc.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    enc.set_defaults(func=_encode)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths, e.g. 256,256") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every width must be a positive integer")
    return widths


def _one_line(exc: Exception) -> str:
    """A pydantic or library error as one line naming the field."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        if not err["loc"]:  # a check across fields: the input is the whole model, the message says what clashes
            return str(err["msg"]).removeprefix("Value error, ")
        where = ".".join(str(part) for part in err["loc"])
        return f"{where}={err.get('input')!r}: {err['msg']}"
    return " ".join(str(exc).split())


def read_patches(path: Path, *, data_config: Any = None, options: dict[str, Any] | None = None) -> Any:
    """A ``models.data.PatchSet`` from ``path``: cut as ``data_config`` says (a run's), or built from ``options``."""
    import numpy as np

    from models.data import DataError, build_patches, patches_from_config

    if not path.exists():
        raise CommandError(f"--data {path}: no such file")
    frames = None
    if path.suffix.lower() != ".npz":
        from sim.formats import ScanFormatError, read_scan

        try:
            frames = np.asarray(read_scan(path).frames)
        except ScanFormatError as exc:
            raise CommandError(_one_line(exc)) from None
    try:
        if data_config is not None:
            return patches_from_config(path, data_config, frames=frames)
        return build_patches(path, frames=frames, **(options or {}))
    except DataError as exc:
        raise CommandError(_one_line(exc)) from None


def open_run(run_dir: Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, RunConfig)`` of a run directory, or a one-line error saying what is missing."""
    if not run_dir.is_dir():
        raise CommandError(f"run directory {run_dir} does not exist; give the --out of `atomstream train`")
    if not (run_dir / "config.json").is_file():
        raise CommandError(f"{run_dir} has no config.json; it is not a run directory written by `atomstream train`")
    from models.checkpoint import load_run

    try:
        return load_run(run_dir, device=device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CommandError(f"cannot load run {run_dir}: {_one_line(exc)}") from None


def _check_train_args(args: argparse.Namespace) -> None:
    if args.classes < 0:
        raise CommandError(f"--classes {args.classes}: must be >= 0 (0 drops the class latent)")
    if args.latent < 1:
        raise CommandError(f"--latent {args.latent}: the continuous latent needs at least 1 dimension")
    if args.epochs < 1 or args.batch_size < 1:
        raise CommandError(f"--epochs {args.epochs} and --batch-size {args.batch_size} must be at least 1")
    if args.lr <= 0:
        raise CommandError(f"--lr {args.lr}: the learning rate must be positive")
    if args.hidden < 1:
        raise CommandError(f"--hidden {args.hidden}: layer width must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} exists and is not a directory; choose a run directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.resume:
        raise CommandError(f"--out {args.out} is not empty; choose a new run directory or pass --resume")


def _train(args: argparse.Namespace) -> int:
    _check_train_args(args)
    from pydantic import ValidationError

    from models.config import Annealing, ModelConfig, RunConfig, TrainConfig

    patches = read_patches(
        args.data,
        options={
            "patch": args.patch,
            "stride": args.stride,
            "fft": args.fft,
            "atoms": args.atoms,
            "atom_sigma": args.atom_sigma,
            "atom_min_distance": args.atom_min_distance,
            "atom_threshold": args.atom_threshold,
            "atom_sublattice": args.atom_sublattice,
        },
    )
    try:
        cfg = RunConfig(
            model=ModelConfig(
                patch=patches.data.patch,
                n_classes=args.classes,
                latent_dim=args.latent,
                rotation=not args.no_rotation,
                translation=not args.no_translation,
                encoder=args.encoder,
                decoder=args.decoder,
                encoder_hidden=args.encoder_hidden or (args.hidden, args.hidden),
                decoder_hidden=args.decoder_hidden or (args.hidden, args.hidden, args.hidden),
                likelihood=args.likelihood,
                **({} if args.gaussian_scale is None else {"gaussian_scale": args.gaussian_scale}),
            ),
            train=TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                device=args.device,
                val_fraction=args.val_fraction,
                progress=not args.no_progress,
                **({} if args.beta2_start is None else {"annealing": Annealing(beta2_start=args.beta2_start)}),
            ),
            data=patches.data,
            name=args.name,
        )
    except ValidationError as exc:
        raise CommandError(_one_line(exc)) from None
    if len(patches) < 2:
        raise CommandError(f"--data {args.data} gives {len(patches)} patch(es); training needs at least 2")
    from models.checkpoint import CheckpointError
    from models.train import FitError, fit

    try:
        result = fit(cfg, patches.images, args.out, resume=args.resume)
    except (FitError, CheckpointError) as exc:
        raise CommandError(_one_line(exc)) from None
    print(
        f"trained {cfg.model.variant} (K={cfg.model.n_classes}, dim z={cfg.model.latent_dim}) on {len(patches)} "
        f"{cfg.model.patch[0]}x{cfg.model.patch[1]} patches for {cfg.train.epochs} epochs -> {args.out}"
    )
    last = _last_losses(result.history)
    if last:
        print("final " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    if cfg.model.n_classes > 1:
        _name_and_report_classes(result.model, patches, cfg.model, args.out)
    return 0


def _name_and_report_classes(model: Any, patches: Any, model_cfg: Any, run_dir: Path) -> None:
    """Name the classes after the labels they match, if the data has named labels; print how the patches spread
    over the classes, and say so plainly when they all went to one.

    The names end up in the manifest and on every published map, so they must say what a class holds: class k of an
    unsupervised model is not label k of the data, hence the matching (on the training patches) before naming.
    """
    from models.checkpoint import rename_classes
    from models.evaluate import class_usage, collapse_warning, encode_images, matched_class_names

    prob = encode_images(model, patches.images)["class_prob"]
    names = model_cfg.names_of_classes()
    if patches.labels is not None and patches.class_names:
        names = matched_class_names(prob.argmax(axis=1), patches.labels, patches.class_names, model_cfg.n_classes)
        rename_classes(run_dir, names)
        print("classes named after the labels they match on the training patches: " + ", ".join(names))
    usage = class_usage(prob)
    print("class usage: " + ", ".join(f"{n} {u:.0%}" for n, u in zip(names, usage, strict=True)))
    warning = collapse_warning(usage, likelihood=model_cfg.likelihood, gaussian_scale=model_cfg.gaussian_scale)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def _last_losses(history: Any) -> dict[str, float]:
    """The last epoch's numbers from a history that is a dict of lists or a list of dicts (whichever fit returns)."""
    out: dict[str, float] = {}
    if isinstance(history, dict):
        for key, values in history.items():
            if isinstance(values, list | tuple) and values and isinstance(values[-1], int | float):
                out[key] = float(values[-1])
    elif isinstance(history, list | tuple) and history and isinstance(history[-1], dict):
        out = {k: float(v) for k, v in history[-1].items() if isinstance(v, int | float)}
    return out


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    from models.evaluate import encode_images

    if args.out.suffix != ".npz":
        raise CommandError(f"--out {args.out}: encodings are written as .npz; use a .npz name")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size} must be at least 1")
    model, cfg = open_run(args.run, args.device)
    patches = read_patches(args.data, data_config=cfg.data)
    enc = encode_images(model, patches.images, batch_size=args.batch_size, device=args.device)
    arrays = {name: enc[name] for name in ("class_prob", "z", "angle", "shift") if name in enc}
    arrays["positions"] = patches.positions
    if patches.grid is not None:
        arrays["grid"] = np.asarray(patches.grid, dtype=np.int64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"encoded {len(patches)} patches -> {args.out} ({shapes})")
    return 0
