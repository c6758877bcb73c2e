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
from typing import TYPE_CHECKING, Any

from atomstream.cli import CommandError
from atomstream.cli._flags import config_flag, from_config, in_flags

if TYPE_CHECKING:
    from models.deadline import Deadline

__all__ = [
    "CELL_MODEL",
    "CELL_TRAIN",
    "DEFAULT_BUDGET_S",
    "ENCODE_FLAGS",
    "default_model",
    "default_translation",
    "encode_with_flags",
    "open_run",
    "read_patches",
    "register",
    "training_threads",
]

#: Training time when no --epochs is given: a few minutes on a 2-core CPU for a few thousand patches.
DEFAULT_BUDGET_S = 300.0


_MODEL, _TRAIN, _DATA = "models.config:ModelConfig", "models.config:TrainConfig", "models.config:DataConfig"
_RUN, _ANNEALING = "models.config:RunConfig", "models.config:Annealing"
_ENCODE = "models.evaluate:encode_images"


def _side(patch: tuple[int, int]) -> str:
    return str(patch[0])


def register(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser("train", help="train a (j)(t)(r)VAE on an image stack (.npz) or a scan")
    data = tr.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help=".npz stack (images N×H×W) or a scan (.npy, .tif, ...)")
    config_flag(data, "--patch", type=int, where=_DATA, field="patch", shown=_side, help="patch side in pixels, scans")
    data.add_argument("--stride", type=int, default=None, help="grid stride for scans (default: patch // 4)")
    data.add_argument("--fft", action="store_true", help="use each patch's centred log-magnitude spectrum")
    data.add_argument("--atoms", action="store_true", help="cut patches centred on atoms instead of on a grid")
    config_flag(data, "--atom-sigma", type=float, where=_DATA, field="atom_sigma", help="atom finder's smoothing σ, px")
    config_flag(data, "--atom-min-distance", type=int, where=_DATA, field="atom_min_distance", help="least gap, px")
    config_flag(data, "--atom-threshold", type=float, where=_DATA, field="atom_threshold", help="relative peak, 0..1")
    data.add_argument(
        "--atom-sublattice",
        choices=("brightest", "all", "cells"),
        default="brightest",
        help="with --atoms: centre patches on one sublattice (brightest), so classes do not split by sublattice; "
        "all keeps every column; cells centres them on that sublattice's unit cells, the column inside each at the "
        "patch centre, for polarisation, and sets that model's own defaults: no rotation latent, --latent 4, "
        "--likelihood gaussian --gaussian-scale 0.1, --class-invariance rotation, --keep best_val (default: "
        "%(default)s)",
    )
    data.add_argument(
        "--patch-norm",
        choices=("none", "minmax"),
        default=None,
        help="rescale each patch to [0, 1] (minmax) or keep the frame's scale (none); default: minmax with --fft or "
        "--atom-sublattice cells, none otherwise",
    )
    model = tr.add_argument_group("model")
    config_flag(model, "--classes", type=int, where=_MODEL, field="n_classes", help="K classes (0: no class latent)")
    config_flag(model, "--latent", type=int, where=_MODEL, field="latent_dim", help="dimension of the continuous z")
    model.add_argument(
        "--rotation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the rotation latent γ (default: on, except for --atom-sublattice cells: there a rotation would turn "
        "one polarisation direction into another, and the direction would leave z for the angle)",
    )
    model.add_argument(
        "--translation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the translation latent s (default: on for stacks and grid patches; off for --atoms and --fft patches, "
        "as in the paper: an atom-centred patch has no translation to undo, and s would take the central column's "
        "displacement, the polarisation signal; a centred FFT magnitude has none to undo either)",
    )
    model.add_argument(
        "--hidden", type=int, default=None, help="one width for every hidden layer (default: the two flags below)"
    )
    config_flag(model, "--encoder-hidden", type=_widths, where=_MODEL, field="encoder_hidden", help="encoder widths")
    config_flag(model, "--decoder-hidden", type=_widths, where=_MODEL, field="decoder_hidden", help="decoder widths")
    config_flag(model, "--encoder", choices=("mlp", "conv"), where=_MODEL, field="encoder", help="encoder network")
    config_flag(
        model,
        "--decoder",
        choices=("mlp", "spatial_broadcast", "dense"),
        where=_MODEL,
        field="decoder",
        help="decoder network (dense: no rotation or translation)",
    )
    config_flag(
        model,
        "--class-invariance",
        choices=("model", "rotation"),
        where=_MODEL,
        field="class_invariance",
        help="what the class head ignores: the model's own transforms, or rotations too (unit cells' default)",
    )
    config_flag(
        model, "--likelihood", choices=("bernoulli", "gaussian"), where=_MODEL, field="likelihood", help="pixel model"
    )
    config_flag(
        model,
        "--gaussian-scale",
        type=float,
        where=_MODEL,
        field="gaussian_scale",
        help="σ of the Gaussian likelihood (smaller σ risks class collapse)",
    )
    opt = tr.add_argument_group("optimisation")
    opt.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training patches (default: as many as fit in --budget, from timed warm-up steps)",
    )
    opt.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds the whole command may take when --epochs is not given: a timed warm-up plans the epochs and "
        "the epochs' own pace re-plans them (at least 5; default: %(default)g)",
    )
    config_flag(opt, "--batch-size", type=int, where=_TRAIN, field="batch_size", help="patches per SVI step")
    config_flag(opt, "--lr", type=float, where=_TRAIN, field="lr", help="Adam learning rate")
    config_flag(
        opt,
        "--keep",
        choices=("last", "best_val"),
        where=_TRAIN,
        field="keep",
        help="the weights the run ends with: the last epoch's, or the epoch's with the lowest held-out loss after the "
        "β ramp (unit-cell patches default to best_val)",
    )
    config_flag(opt, "--seed", type=int, where=_TRAIN, field="seed", help="seed of weights, split and batches")
    config_flag(
        opt,
        "--pixel-fraction",
        type=float,
        where=_TRAIN,
        field="pixel_fraction",
        help="share of each patch's pixels the reconstruction term scores per step (unbiased, cheaper)",
    )
    config_flag(
        opt,
        "--decoder-matmul",
        choices=("auto", "full", "bfloat16"),
        where=_TRAIN,
        field="decoder_matmul",
        help="precision of the decoder's matmuls on the CPU: bfloat16 is faster with 256-wide decoder layers, "
        "slightly worse in held-out ELBO (docs/training.md); auto: bfloat16 where the CPU has it natively",
    )
    config_flag(
        opt,
        "--class-init",
        choices=("invariant_gmm", "random"),
        where=_TRAIN,
        field="class_init",
        help="where the class head starts: a mixture of the patches in transform-invariant features, or random",
    )
    config_flag(
        opt, "--beta2-start", type=float, where=_ANNEALING, field="beta2_start", help="β2 on z when annealing starts"
    )
    config_flag(opt, "--device", choices=("auto", "cpu", "cuda"), where=_TRAIN, field="device", help="where to train")
    opt.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads: torch runs one intra-op thread and the decoder's likelihood spreads its chunks over N "
        "(default: every CPU this process may use)",
    )
    config_flag(
        opt, "--val-fraction", type=float, where=_TRAIN, field="val_fraction", help="share held out for validation"
    )
    opt.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="training processes on this machine, with PyTorch DistributedDataParallel (gloo on CPU, NCCL on CUDA): "
        "each takes --batch-size patches per step, so a step takes N times as many (default: %(default)s; under "
        "torchrun leave it at 1)",
    )
    opt.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint: the last epoch's weights and Adam's moments (also "
        "after --keep best_val, whose kept epoch stays a candidate), at this command's --epochs and --lr",
    )
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_flag(tr, "--name", where=_RUN, field="name", help="model name recorded in the run and its artifact")
    tr.add_argument("--out", type=Path, required=True, help="run directory to write (config.json, weights)")
    tr.set_defaults(func=_train)

    enc = subparsers.add_parser("encode", help="encode data with a trained run into an .npz of latents")
    enc.add_argument("run", type=Path, help="run directory written by `atomstream train`")
    enc.add_argument("--data", type=Path, required=True, help="data cut like the run's training data")
    enc.add_argument("--out", type=Path, required=True, help="output .npz")
    config_flag(enc, "--batch-size", type=int, where=_ENCODE, field="batch_size", help="patches per encoder call")
    config_flag(enc, "--device", choices=("cpu", "cuda"), where=_ENCODE, field="device", help="where to encode")
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
        where = ".".join(str(part) for part in err["loc"] if not isinstance(part, int))  # not the tuple index
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
        raise CommandError(in_flags(_one_line(exc), _DATA_FLAGS)) from None


#: the flags of ``encode``, ``evaluate`` and ``plot`` that go to ``models.evaluate.encode_images``
ENCODE_FLAGS = {"batch_size": "batch_size", "device": "device"}


def encode_with_flags(model: Any, images: Any, given: dict[str, Any]) -> dict[str, Any]:
    """``encode_images`` with the flags given (its own defaults otherwise); its errors in the CLI's words."""
    from models.evaluate import encode_images

    try:
        return encode_images(model, images, **given)
    except ValueError as exc:
        raise CommandError(in_flags(_one_line(exc), ENCODE_FLAGS)) from None


def open_run(run_dir: Path, device: str | None = None) -> tuple[Any, Any]:
    """``(model, RunConfig)`` of a run directory (on ``device``, None: ``load_run``'s default), or a one-line error
    saying what is missing."""
    if not run_dir.is_dir():
        raise CommandError(f"run directory {run_dir} does not exist; give the --out of `atomstream train`")
    if not (run_dir / "config.json").is_file():
        raise CommandError(f"{run_dir} has no config.json; it is not a run directory written by `atomstream train`")
    from models.checkpoint import load_run

    try:
        return load_run(run_dir, **({} if device is None else {"device": device}))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CommandError(f"cannot load run {run_dir}: {_one_line(exc)}") from None


def _check_train_args(args: argparse.Namespace) -> None:
    """What pydantic cannot see: the run directory on disk. Value bounds are the configs' to check."""
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} exists and is not a directory; choose a run directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.resume:
        raise CommandError(f"--out {args.out} is not empty; choose a new run directory or pass --resume")
    if args.budget <= 0:
        raise CommandError(f"--budget {args.budget}: the time budget must be a positive number of seconds")
    if args.nproc < 1:
        raise CommandError(f"--nproc {args.nproc}: give the number of training processes, at least 1")


#: namespace attribute -> config field, for the flags that set one (and for naming flags in errors)
_DATA_FLAGS = {
    "patch": "patch",
    "stride": "stride",
    "atom_sigma": "atom_sigma",
    "atom_min_distance": "atom_min_distance",
    "atom_threshold": "atom_threshold",
}
_MODEL_FLAGS = {
    "classes": "n_classes",
    "latent": "latent_dim",
    "rotation": "rotation",
    "translation": "translation",
    "class_invariance": "class_invariance",
    "encoder_hidden": "encoder_hidden",
    "decoder_hidden": "decoder_hidden",
    "encoder": "encoder",
    "decoder": "decoder",
    "likelihood": "likelihood",
    "gaussian_scale": "gaussian_scale",
}
_TRAIN_FLAGS = {
    n: n
    for n in (
        "epochs",
        "batch_size",
        "lr",
        "seed",
        "device",
        "val_fraction",
        "class_init",
        "pixel_fraction",
        "decoder_matmul",
        "keep",
    )
}
_ALL_FLAGS = {
    **_DATA_FLAGS,
    **_MODEL_FLAGS,
    **_TRAIN_FLAGS,
    "beta2_start": "beta2_start",
    "name": "name",
    "threads": "likelihood_threads",
}


#: a unit-cell patch wider than this share of the cell's spacing reaches the corner columns (at 0.71 spacings)
CELL_PATCH_MAX = 0.6
#: the side to suggest instead: the inner column and its flanks (the real-data benchmark cuts its cell patches so)
CELL_PATCH = 0.42


def cells_line(centres: Any, side: int) -> str:
    """What a cells run found, and a hint when its patches reach past the column inside each cell: there the corner
    columns' brightness, not the inner column's position, is what varies most (docs/real-data.md)."""
    from streamer.maps.atoms import median_spacing

    if len(centres) < 2:
        return f"unit cells: {len(centres)}"
    spacing = median_spacing(centres)
    line = f"unit cells: {len(centres)}, spacing {spacing:.1f} px; patch {side} px = {side / spacing:.2f} spacings"
    if side > CELL_PATCH_MAX * spacing:
        line += (
            f" — it reaches the cell's corner columns; for the inner column's displacement choose --patch about "
            f"{round(CELL_PATCH * spacing)} ({CELL_PATCH} spacings)"
        )
    return line


def default_translation(data: Any) -> bool:
    """Whether a model on ``data``'s patches gets the translation latent when ``--translation`` is not given: not for
    atom-centred patches (the finder already centred them, sub-pixel; what is left to move is the signal) nor for
    FFT magnitudes (translation-invariant by construction) — the paper turns it off for both."""
    return data.kind != "atoms" and data.preprocessing.fft == "none"


#: The model --atom-sublattice cells trains unless its flags say otherwise: the polarisation recipe. Each piece was
#: measured on the PbTiO₃/SrRuO₃ scan (docs/real-data.md): with the rotation latent, a rotation of the cell moves its
#: column as a displacement would, and the direction went into the angle; without it a class head reading the pixels
#: split the film by displacement direction (so its features ignore rotations still); a σ 0.1 Gaussian keeps the
#: low-variance displacement modes the Bernoulli likelihood treats as noise; and z has 4 dimensions because one
#: principal mode of these patches that is neither direction is stronger than the dx mode, and a fourth gave z the
#: displacement at or above PCA of its own dimension at every seed where 3 stayed under it (docs/real-data.md).
CELL_MODEL: dict[str, Any] = {
    "rotation": False,
    "latent_dim": 4,
    "likelihood": "gaussian",
    "gaussian_scale": 0.1,
    "class_invariance": "rotation",
}
#: ``TrainConfig`` fields of the cells recipe: a few hundred small patches over-fit within a default budget (the
#: PbTiO3 cells' held-out ELBO turns after ~300 epochs of ~1000), so the run keeps its best held-out epoch.
CELL_TRAIN: dict[str, Any] = {"keep": "best_val"}


def _unit_cells(data: Any) -> bool:
    """Whether ``data`` cuts unit-cell patches: the cells recipe (``CELL_MODEL``, ``CELL_TRAIN``) applies."""
    return bool(data.kind == "atoms" and data.atom_sublattice == "cells")


def default_model(data: Any) -> dict[str, Any]:
    """``ModelConfig`` fields a model on ``data``'s patches gets where no flag sets them: the translation latent as
    ``default_translation`` says, and ``CELL_MODEL`` for unit-cell patches; the configs' own defaults otherwise."""
    return {"translation": default_translation(data), **(CELL_MODEL if _unit_cells(data) else {})}


def run_config(args: argparse.Namespace, data: Any) -> Any:
    """The ``RunConfig`` of the flags given; everything not given is the configs' default (public: the real-data
    benchmark trains with exactly this recipe)."""
    from models.config import Annealing, ModelConfig, RunConfig, TrainConfig

    model = {**default_model(data), **from_config(args, _MODEL_FLAGS)}
    if args.hidden is not None:
        model.setdefault("encoder_hidden", (args.hidden,) * 2)
        model.setdefault("decoder_hidden", (args.hidden,) * 3)
    train = {**(CELL_TRAIN if _unit_cells(data) else {}), **from_config(args, _TRAIN_FLAGS)}
    if args.beta2_start is not None:
        train["annealing"] = Annealing(beta2_start=args.beta2_start)
    run = {"name": args.name} if args.name is not None else {}
    return RunConfig(
        model=ModelConfig(patch=data.patch, **model),
        train=TrainConfig(likelihood_threads=training_threads(args.threads), progress=not args.no_progress, **train),
        data=data,
        **run,
    )


def _train(args: argparse.Namespace) -> int:
    _check_train_args(args)
    from pydantic import ValidationError

    from models.deadline import Deadline

    # The budget is the whole command's: reading the patches (the atom finder) and the warm start count against it.
    budgeted = args.epochs is None and not args.resume
    deadline = Deadline.starting_now(args.budget) if budgeted else None

    sublattice = {"atom_sublattice": args.atom_sublattice} if args.atoms else {}
    options = {"fft": args.fft, "atoms": args.atoms, "patch_norm": args.patch_norm, **sublattice}
    patches = read_patches(args.data, options={**options, **from_config(args, _DATA_FLAGS)})
    try:
        cfg = run_config(args, patches.data)
    except ValidationError as exc:
        raise CommandError(in_flags(_one_line(exc), _ALL_FLAGS)) from None
    if len(patches) < 2:
        raise CommandError(f"--data {args.data} gives {len(patches)} patch(es); training needs at least 2")
    if _unit_cells(patches.data):
        first = patches.positions[:, 0] == patches.positions[0, 0]  # one frame's cells: frames overlap in place
        print(cells_line(patches.centres[first], patches.data.patch[0]), flush=True)
    from models.checkpoint import CheckpointError
    from models.distributed import torchrun_world
    from models.train import FitError

    ranked = torchrun_world()
    if ranked is not None and args.epochs is None and not args.resume:
        raise CommandError("under torchrun every rank must train the same epochs: pass --epochs (no time budget)")
    if budgeted:
        from models.budget import plan_epochs

        plan = plan_epochs(cfg, patches.images, args.budget)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": plan.epochs})})
        follow = "; the first epochs' pace re-plans it to end in time" if args.nproc == 1 else ""
        print(f"training plan: {plan.describe()}{follow}; --epochs or --budget changes it", flush=True)
    print(f"decoder matmuls: {_matmul_line(cfg.train)}", flush=True)
    try:
        result = _fit(cfg, patches.images, args, deadline if args.nproc == 1 else None)
    except (FitError, CheckpointError) as exc:
        raise CommandError(_one_line(exc)) from None
    if ranked is not None and ranked[0] != 0:
        return 0  # rank 0 reports and names the classes
    planned = cfg.train.epochs
    replanned = f" (re-planned from {planned} at the epochs' pace)" if result.epochs != planned else ""
    print(
        f"trained {cfg.model.variant} (K={cfg.model.n_classes}, dim z={cfg.model.latent_dim}) on {len(patches)} "
        f"{cfg.model.patch[0]}x{cfg.model.patch[1]} patches for {result.epochs} epochs{replanned} -> {args.out}"
    )
    last = _last_losses(result.history)
    if last:
        print("final " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    if result.kept_epoch is not None:
        val = next(r["val_loss"] for r in result.history if r["epoch"] == result.kept_epoch)
        print(
            f"kept the weights of epoch {result.kept_epoch} (val_loss {val:.4g}, the lowest after the β ramp; "
            "--keep last keeps the final epoch's)"
        )
    if cfg.model.n_classes > 1:
        _name_and_report_classes(result.model, patches, cfg.model, args.out, result.diagnosis)
    return 0


def _matmul_line(train: Any) -> str:
    """What ``TrainConfig.decoder_matmul`` became on this machine, so a user comparing two machines sees why."""
    import torch

    from models.fused_likelihood import native_bfloat16, resolve_matmul
    from models.likelihood_path import likelihood_path
    from models.train import resolve_device

    device = resolve_device(train.device)
    if likelihood_path(device) != "fused":
        return f"{train.dtype}, autograd on {device.type} (--decoder-matmul applies to the CPU kernel only)"
    used = resolve_matmul(train.decoder_matmul, getattr(torch, train.dtype))
    native = "native on this CPU" if native_bfloat16() else "not native on this CPU"
    return f"{used} (--decoder-matmul {train.decoder_matmul}; bfloat16 {native})"


def _fit(cfg: Any, images: Any, args: argparse.Namespace, deadline: Deadline | None) -> Any:
    """``fit`` in this process (ending by ``deadline`` when there is one), on ``--nproc`` local processes (the
    warm-up's plan, fixed: ranks must agree on it), or as this rank of a ``torchrun`` launch."""
    from models.distributed import fit_distributed, fit_torchrun_rank, torchrun_world
    from models.train import fit

    if torchrun_world() is not None:
        return fit_torchrun_rank(cfg, images, args.out, resume=args.resume)
    if args.nproc == 1:
        return fit(cfg, images, args.out, resume=args.resume, deadline=deadline)
    if args.threads is None:  # the CPUs are shared out between the processes
        threads = max(1, cfg.train.likelihood_threads // args.nproc)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"likelihood_threads": threads})})
    print(
        f"training on {args.nproc} processes (DistributedDataParallel), {cfg.train.likelihood_threads} thread(s) "
        f"each: {args.nproc} x {cfg.train.batch_size} = {args.nproc * cfg.train.batch_size} patches per step",
        flush=True,
    )
    return fit_distributed(cfg, images, args.out, nproc=args.nproc, resume=args.resume, worker_setup=training_threads)


def training_threads(asked: int | None = None) -> int:
    """Set torch to one intra-op thread and return how many threads the decoder's likelihood should spread its
    chunks over (``asked``, or every CPU this process may use) — ``TrainConfig.likelihood_threads``.

    Process-wide, so here in the CLI and not in ``models``: chunks side by side with each op single-threaded is
    fastest (the intra-op barrier after every small op is what slows training on a busy machine; on 2 loaded cores
    a 48×48 K=4 step took ~8 s this way against ~26 s on torch's two intra-op threads).
    """
    import os

    import torch

    torch.set_num_threads(1)
    if asked is not None:
        return asked
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _name_and_report_classes(model: Any, patches: Any, model_cfg: Any, run_dir: Path, diagnosis: Any) -> None:
    """Name the classes after the labels they match, if the data has named labels; print how the patches spread
    over the classes, and say so plainly when they all went to one.

    The names end up in the manifest and on every published map, so they must say what a class holds: class k of an
    unsupervised model is not label k of the data, hence the matching (on the training patches) before naming.
    """
    from models.checkpoint import rename_classes
    from models.evaluate import ClassDiagnosis, class_usage, collapse_warning, encode_images, matched_class_names

    prob = encode_images(model, patches.images)["class_prob"]
    names = model_cfg.names_of_classes()
    if patches.labels is not None and patches.class_names:
        names = matched_class_names(prob.argmax(axis=1), patches.labels, patches.class_names, model_cfg.n_classes)
        rename_classes(run_dir, names)
        print("classes named after the labels they match on the training patches: " + ", ".join(names))
    usage = class_usage(prob)
    print("class usage: " + ", ".join(f"{n} {u:.0%}" for n, u in zip(names, usage, strict=True)))
    if diagnosis is None:
        return
    diag = ClassDiagnosis.from_dict(diagnosis)
    print("class diagnosis: " + diag.summary())
    warning = collapse_warning(diag, likelihood=model_cfg.likelihood, gaussian_scale=model_cfg.gaussian_scale)
    if warning:
        print(f"warning: {warning}. `atomstream export` refuses this run unless --force.", file=sys.stderr)


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

    if args.out.suffix != ".npz":
        raise CommandError(f"--out {args.out}: encodings are written as .npz; use a .npz name")
    given = from_config(args, ENCODE_FLAGS)
    model, cfg = open_run(args.run, given.get("device"))
    patches = read_patches(args.data, data_config=cfg.data)
    enc = encode_with_flags(model, patches.images, given)
    arrays = {name: enc[name] for name in ("class_prob", "z", "angle", "shift") if name in enc}
    arrays["positions"] = patches.positions
    if patches.grid is not None:
        arrays["grid"] = np.asarray(patches.grid, dtype=np.int64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"encoded {len(patches)} patches -> {args.out} ({shapes})")
    return 0
