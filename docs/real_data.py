"""The real-data walkthrough (docs/real-data.md): j-rVAE on FFT patches of an STM scan of graphene with defects.

Train on the left half of the scan, export the encoder as an artifact, and stream the right half — which the model
never saw — through the serving path (``streamer.encoder.load`` + ``streamer.pipeline.Pipeline``, ONNX Runtime), then
draw the figures the paper draws: class map, defect map, the continuous latents in real space, latent traversals.

Run::

    python docs/real_data.py --data /work/shared/data/stm_graphene_Hdefects.npy --out docs/figures/real-data

The functions are importable (``tests/test_docs_real_data.py`` runs them on a small synthetic lattice), so the
walkthrough cannot silently rot when the library changes underneath it.

There is no labelled ground truth for this scan. ``MARKED_DEFECTS`` are the defects we identified by eye in the image
(the bright triangular √3×√3 patterns and one bright blob), centres good to about ±20 px; they are used only to name
the classes after training and to score the maps, never in training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

# Run as a script from anywhere: the repository root (this file's parent's parent) holds the packages.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from exporters.export import export_model  # noqa: E402
from exporters.verify import MAX_PARITY_PATCHES, MIN_PARITY_PATCHES  # noqa: E402
from models.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from models.data import PatchSet, scan_patches  # noqa: E402
from models.evaluate import encode_images  # noqa: E402
from models.jtrvae import JTrVAE  # noqa: E402
from models.plots import plot_traversals  # noqa: E402
from models.train import TrainResult, fit  # noqa: E402
from streamer.encoder import load  # noqa: E402
from streamer.pipeline import FrameMaps, Pipeline  # noqa: E402
from streamer.preprocess import Preprocessing  # noqa: E402

__all__ = [
    "MARKED_DEFECTS",
    "ROLES",
    "DataMissingError",
    "Settings",
    "StreamedHalf",
    "data_config",
    "export_named",
    "load_frame",
    "main",
    "mark_scores",
    "name_classes",
    "run_config",
    "split_halves",
    "stream_half",
    "train_half",
]

#: Defects identified by eye in stm_graphene_Hdefects.npy: (y, x) in full-frame pixels, ±20 px. Index 2 is the bright
#: blob (an adsorbate or tip feature, not a triangle); all others are triangular √3×√3 interference patterns.
MARKED_DEFECTS: tuple[tuple[int, int], ...] = (
    (575, 115),
    (545, 630),
    (925, 355),
    (1180, 665),
    (1385, 435),
    (680, 765),
    (665, 1395),
    (870, 1400),
    (865, 830),
    (840, 1115),
    (945, 1060),
    (1120, 910),
    (1230, 1320),
    (1375, 1070),
)

#: Names given to the K = 3 classes after training, in the order the artifact lists them.
ROLES: tuple[str, str, str] = ("lattice", "defect", "interference")


class DataMissingError(FileNotFoundError):
    """The scan is not where the command line says; the message says where to get it."""


@dataclass(frozen=True)
class Settings:
    """The walkthrough's choices (docs/real-data.md explains each)."""

    patch: int = 48
    stride: int = 12
    train_patches: int = 2000
    epochs: int = 16
    batch_size: int = 64
    lr: float = 1e-3
    encoder_hidden: tuple[int, ...] = (128, 128)
    decoder_hidden: tuple[int, ...] = (64, 64)
    likelihood: Literal["bernoulli", "gaussian"] = "gaussian"
    gaussian_scale: float = 0.1
    seed: int = 0
    mark_radius: float = 40.0


@dataclass(frozen=True)
class StreamedHalf:
    """One half-frame streamed through the serving pipeline, and where it sits in the full frame."""

    maps: FrameMaps
    x_offset: int
    seconds: float


def load_frame(path: str | Path) -> np.ndarray:
    """The scan as one 2-D array (raw values: the pipeline normalises each frame itself)."""
    p = Path(path)
    if not p.is_file():
        raise DataMissingError(
            f"no scan at {str(p)!r}: the walkthrough needs stm_graphene_Hdefects.npy (see shared/data/SOURCES.md: "
            "GitHub ziatdinovmax/SciLink, data/GH_stm.tif, saved as .npy); pass its path with --data"
        )
    if p.suffix.lower() == ".npy":
        frame = np.load(p, allow_pickle=False)
    else:
        from sim.formats import read_scan

        frame = np.asarray(read_scan(p).frames)
    frame = np.squeeze(frame)
    if frame.ndim != 2:
        raise ValueError(f"{str(p)!r} holds an array of shape {frame.shape}; the walkthrough needs one 2-D scan")
    return frame


def split_halves(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(left, right, x of the split)``: the left half trains the model, the right half is the unseen region."""
    split = frame.shape[1] // 2
    return frame[:, :split], frame[:, split:], split


def data_config(settings: Settings, source: str) -> DataConfig:
    """Grid patches → centred log-magnitude FFT with a Hann window → per-patch min-max.

    The window matters: without it the patch edges put a bright cross through every spectrum that varies with
    where the patch cuts the lattice, which is exactly the nuisance the FFT was meant to remove.
    """
    return DataConfig(
        source=source,
        kind="grid",
        patch=(settings.patch, settings.patch),
        stride=(settings.stride, settings.stride),
        preprocessing=Preprocessing(frame_norm="percentile", fft="logmag", window="hann", patch_norm="minmax"),
    )


def run_config(settings: Settings, data: DataConfig, *, progress: bool = False) -> RunConfig:
    """K = 3, dim z = 2, rotation on, translation off (an FFT magnitude does not move when the patch does)."""
    return RunConfig(
        name="graphene-stm-fft",
        model=ModelConfig(
            patch=data.patch,
            n_classes=3,
            latent_dim=2,
            rotation=True,
            translation=False,
            encoder_hidden=settings.encoder_hidden,
            decoder_hidden=settings.decoder_hidden,
            likelihood=settings.likelihood,
            gaussian_scale=settings.gaussian_scale,
        ),
        train=TrainConfig(
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=settings.seed,
            device="cpu",
            val_fraction=0.1,
            progress=progress,
        ),
        data=data,
    )


def train_half(
    half: np.ndarray, run: RunConfig, run_dir: Path | None, *, max_patches: int, seed: int
) -> tuple[TrainResult, PatchSet]:
    """Fit on a seeded random subset of the half's grid patches (training cost is per patch; encoding is cheap).

    Returns the fit and *all* the half's patches, so that the offline encoding can be compared with the stream.
    """
    patches = scan_patches(half[None], run.data)
    rng = np.random.default_rng(seed)
    n = len(patches)
    index = np.sort(rng.choice(n, size=min(max_patches, n), replace=False))
    result = fit(run, patches.images[index], run_dir)
    return result, patches


def mark_scores(
    class_prob: np.ndarray, centres: np.ndarray, marks: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: ``(share of the class's patches near a mark, share of near-mark patches in the class)``.

    "Near" is a patch centre within ``radius`` of a marked defect. The first number is a precision-like enrichment,
    the second a recall-like coverage; both are descriptive, since the marks are eye-picked.
    """
    cls = class_prob.argmax(axis=1)
    k = class_prob.shape[1]
    if marks.size == 0:
        return np.zeros(k), np.zeros(k)
    d = np.min(np.hypot(centres[:, None, 0] - marks[None, :, 0], centres[:, None, 1] - marks[None, :, 1]), axis=1)
    near = d <= radius
    enrich = np.array([near[cls == c].mean() if np.any(cls == c) else 0.0 for c in range(k)])
    cover = np.array([(cls[near] == c).mean() if near.any() else 0.0 for c in range(k)])
    return enrich, cover


def name_classes(class_prob: np.ndarray, centres: np.ndarray, marks: np.ndarray, radius: float) -> tuple[int, ...]:
    """Class indices in ``ROLES`` order: lattice = the most frequent class; defect = the one of the other two most
    enriched near the marked defects; interference = the last one.

    This is naming after the fact, like matching clusters to labels: the model is unsupervised and its class
    indices are arbitrary.
    """
    counts = np.bincount(class_prob.argmax(axis=1), minlength=class_prob.shape[1])
    lattice = int(np.argmax(counts))
    enrich, _ = mark_scores(class_prob, centres, marks, radius)
    rest = [c for c in range(class_prob.shape[1]) if c != lattice]
    defect = max(rest, key=lambda c: (enrich[c], counts[c]))
    others = [c for c in rest if c != defect]
    return (lattice, defect, *others)


def _parity_patches(images: np.ndarray, *, seed: int) -> torch.Tensor:
    """At most ``MAX_PARITY_PATCHES`` real patches, evenly spaced; a small frame is topped up with seeded uniform
    noise to the exporter's minimum (``exporters.verify.parity_patches`` does the same for a run's own data)."""
    x = torch.from_numpy(images[:, None])
    if x.shape[0] > MAX_PARITY_PATCHES:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_PARITY_PATCHES).round().long()]
    short = MIN_PARITY_PATCHES - x.shape[0]
    if short > 0:
        noise = torch.rand((short, *x.shape[1:]), generator=torch.Generator().manual_seed(seed))
        x = torch.cat([x, noise])
    return x.contiguous()


def export_named(
    result: TrainResult, run: RunConfig, patches: PatchSet, roles: tuple[int, ...], artifact_dir: Path
) -> RunConfig:
    """Export with the classes renamed to ``ROLES`` and the defect class flagged for the service.

    The class order of the network is kept (renaming moves no weight): ``class_names[k]`` is the role of index k.
    """
    names = ["?"] * run.model.n_classes
    for role, k in zip(ROLES, roles, strict=False):
        names[k] = role
    named = run.model_copy(update={"model": run.model.model_copy(update={"class_names": tuple(names)})})
    model = JTrVAE(named.model)
    model.load_state_dict(result.model.state_dict())
    parity = _parity_patches(patches.images, seed=run.train.seed)
    export_model(
        model,
        named,
        artifact_dir,
        parity_patches=parity,
        parity_data=f"grid patches of the training half of {run.data.source}",
        defect_classes=(roles[1],),
    )
    return named


def stream_half(artifact_dir: Path, half: np.ndarray, x_offset: int) -> StreamedHalf:
    """The serving path, in process: load the ONNX artifact (hashes and I/O checked) and run one frame through it."""
    encoder = load(artifact_dir, backend="onnx", device="cpu", batch_sizes=(1, 512))
    pipeline = Pipeline(encoder, max_batch_patches=512)
    t0 = time.perf_counter()
    maps = pipeline.process(half)
    return StreamedHalf(maps=maps, x_offset=x_offset, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- figures


def _grid_extent(maps: FrameMaps, x_offset: int) -> tuple[float, float, float, float]:
    """imshow extent that puts grid cell (i, j) on its patch centre, one stride wide, in full-frame pixels."""
    gh, gw = maps.grid or (0, 0)
    (ph, pw), (sy, sx), (y0, x0) = maps.patch, maps.stride, maps.origin
    cy0, cx0 = y0 + (ph - 1) / 2, x0 + (pw - 1) / 2 + x_offset
    return (cx0 - sx / 2, cx0 + (gw - 0.5) * sx, cy0 + (gh - 0.5) * sy, cy0 - sy / 2)


def _grid_centres(maps: FrameMaps, x_offset: int) -> np.ndarray:
    gh, gw = maps.grid or (0, 0)
    (ph, pw), (sy, sx), (y0, x0) = maps.patch, maps.stride, maps.origin
    gy, gx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    ys = y0 + gy.ravel() * sy + (ph - 1) / 2
    xs = x0 + gx.ravel() * sx + (pw - 1) / 2 + x_offset
    return np.stack([ys, xs], axis=1)


def _display(frame: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A 4× downsampled copy for drawing (the figures stay small) and its 0.5/99.5 % display range."""
    small = frame[::4, ::4].astype(np.float32)
    lo, hi = np.percentile(small, [0.5, 99.5])
    return small, float(lo), float(hi)


def _frame_axes(ax: object, frame: np.ndarray, split: int, marks: np.ndarray, title: str) -> None:
    small, lo, hi = _display(frame)
    h, w = frame.shape
    ax.imshow(small, cmap="gray", vmin=lo, vmax=hi, extent=(0, w, h, 0))  # type: ignore[attr-defined]
    _decorate(ax, frame.shape, split, marks, title)


def _decorate(ax: object, shape: tuple[int, int], split: int, marks: np.ndarray, title: str) -> None:
    import matplotlib.pyplot as plt

    h, w = shape
    ax.axvline(split, color="white", lw=1.0, ls="--")  # type: ignore[attr-defined]
    for y, x in marks:
        ax.add_patch(plt.Circle((x, y), 40, fill=False, color="red", lw=0.8))  # type: ignore[attr-defined]
    ax.set_xlim(0, w)  # type: ignore[attr-defined]
    ax.set_ylim(h, 0)  # type: ignore[attr-defined]
    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return _shrink(path)


def _shrink(path: Path) -> Path:
    """A 64-colour palette keeps the committed figures at tens of kB (noisy grey frames compress badly as RGBA)."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)
    return path


def _plt() -> object:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_overview(
    frame: np.ndarray, halves: list[StreamedHalf], roles: tuple[int, ...], marks: np.ndarray, out: Path
) -> list[Path]:
    """classes.png (frame + class overlay), defect-map.png (P(defect)), latents.png (z0, z1), all full frame."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    split = halves[1].x_offset
    paths = []
    # class overlay: colour by role, not by index, so the legend reads lattice / defect / interference
    role_of = np.empty(len(roles), dtype=np.int64)
    for r, k in enumerate(roles):
        role_of[k] = r
    cmap = ListedColormap(["#1f77b4", "#d62728", "#ff7f0e"][: len(roles)])
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))  # type: ignore[attr-defined]
    _frame_axes(axes[0], frame, split, marks, "scan (left: training half | right: streamed, unseen)")
    _frame_axes(axes[1], frame, split, np.zeros((0, 2)), "class (argmax): blue lattice, red defect, orange interf.")
    for half in halves:
        cls = role_of[half.maps.arrays["class"].astype(np.int64)]
        axes[1].imshow(
            cls, cmap=cmap, vmin=-0.5, vmax=len(roles) - 0.5, alpha=0.45, interpolation="nearest",
            extent=_grid_extent(half.maps, half.x_offset),
        )  # fmt: skip
    _decorate(axes[1], frame.shape, split, marks, axes[1].get_title())
    fig.tight_layout()
    paths.append(_save(fig, out / "classes.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))  # type: ignore[attr-defined]
    _frame_axes(axes[0], frame, split, marks, "scan with eye-marked defects (red circles)")
    for half in halves:
        im = axes[1].imshow(
            half.maps.arrays["class_prob"][..., roles[1]], cmap="magma", vmin=0, vmax=1,
            interpolation="nearest", extent=_grid_extent(half.maps, half.x_offset),
        )  # fmt: skip
    for half in halves:
        for d in half.maps.defects:
            axes[1].plot(d.x + half.x_offset, d.y, "c+", ms=6, mew=1.2)
    _decorate(axes[1], frame.shape, split, marks, "P(defect class); cyan +: regions the service reports")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    fig.tight_layout()
    paths.append(_save(fig, out / "defect-map.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))  # type: ignore[attr-defined]
    z_all = np.concatenate([h.maps.arrays["z"].reshape(-1, 2) for h in halves])
    for d in range(2):
        # deviations from the scan's median: a collapsed or offset latent still shows whatever structure it has
        mid = float(np.median(z_all[:, d]))
        lim = max(float(np.percentile(np.abs(z_all[:, d] - mid), 99.5)), 1e-6)
        for half in halves:
            im = axes[d].imshow(
                half.maps.arrays["z"][..., d] - mid, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                extent=_grid_extent(half.maps, half.x_offset),
            )  # fmt: skip
        _decorate(axes[d], frame.shape, split, marks, f"z{d} − {mid:+.2f} (its median), both halves")
        fig.colorbar(im, ax=axes[d], fraction=0.046, pad=0.02)
    fig.tight_layout()
    paths.append(_save(fig, out / "latents.png"))
    return paths


def plot_unseen(frame: np.ndarray, half: StreamedHalf, roles: tuple[int, ...], marks: np.ndarray, out: Path) -> Path:
    """unseen-half.png: what the service published for the right half, next to the raw frame."""
    plt = _plt()
    region = frame[:, half.x_offset :]
    h, w = region.shape
    local = marks[marks[:, 1] >= half.x_offset] - np.array([0, half.x_offset]) if marks.size else marks
    fig, axes = plt.subplots(1, 4, figsize=(14, 6.2))  # type: ignore[attr-defined]
    small, lo, hi = _display(region)
    axes[0].imshow(small, cmap="gray", vmin=lo, vmax=hi, extent=(0, w, h, 0))
    panels = [
        ("P(defect)", half.maps.arrays["class_prob"][..., roles[1]], "magma", (0.0, 1.0)),
        ("z0 − median", half.maps.arrays["z"][..., 0], "RdBu_r", None),
        ("z1 − median", half.maps.arrays["z"][..., 1], "RdBu_r", None),
    ]
    for ax, (name, values, cmap, rng) in zip(axes[1:], panels, strict=True):
        if rng is None:
            values = values - float(np.median(values))
            lim = max(float(np.percentile(np.abs(values), 99.5)), 1e-6)
            rng = (-lim, lim)
        im = ax.imshow(
            values, cmap=cmap, vmin=rng[0], vmax=rng[1], interpolation="nearest",
            extent=_grid_extent(half.maps, 0),
        )  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, orientation="horizontal")
        ax.set_title(name, fontsize=9)
    for ax, title in zip(axes, ["unseen half (raw)", "P(defect)", "z0 − median", "z1 − median"], strict=True):
        _decorate(ax, (h, w), -1, local, title)
    for d in half.maps.defects:
        axes[1].plot(d.x, d.y, "c+", ms=7, mew=1.3)
    fig.tight_layout()
    return _save(fig, out / "unseen-half.png")


def plot_class_examples(patches: PatchSet, enc: dict[str, np.ndarray], roles: tuple[int, ...], out: Path) -> Path:
    """class-examples.png: per class, its mean input spectrum and the raw regions of its most confident patches."""
    plt = _plt()
    n_ex = 5
    prob = enc["class_prob"]
    cls = prob.argmax(axis=1)
    fig, axes = plt.subplots(len(roles), 1 + n_ex, figsize=(1.6 * (1 + n_ex), 1.7 * len(roles)), squeeze=False)  # type: ignore[attr-defined]
    for r, k in enumerate(roles):
        members = np.flatnonzero(cls == k)
        ax = axes[r, 0]
        if members.size:
            ax.imshow(patches.images[members].mean(axis=0), cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(f"{ROLES[r]}\n({members.size})", fontsize=8)
        if r == 0:
            ax.set_title("mean spectrum", fontsize=8)
        best = members[np.argsort(prob[members, k])[::-1][:n_ex]] if members.size else []
        for j in range(n_ex):
            ax = axes[r, 1 + j]
            if j < len(best):
                ax.imshow(patches.images[best[j]], cmap="gray", vmin=0, vmax=1)
                y, x = patches.positions[best[j], 1:]
                ax.set_title(f"y{y} x{x}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("training half: mean input spectrum per class, and its most confident patches' spectra", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "class-examples.png")


def plot_training(result: TrainResult, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3))  # type: ignore[attr-defined]
    epochs = [h["epoch"] for h in result.history]
    ax.plot(epochs, [h["loss"] for h in result.history], label="train")
    if result.history and result.history[0].get("val_loss") is not None:
        ax.plot(epochs, [h["val_loss"] for h in result.history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("−ELBO per patch (β-weighted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "training.png")


# ---------------------------------------------------------------------------------------------------- main


def _argv(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="stm_graphene_Hdefects.npy (or any 2-D scan)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the figures and summary.json")
    parser.add_argument("--work", type=Path, default=None, help="keep the run and the artifact here (default: temp)")
    parser.add_argument("--patch", type=int, default=Settings.patch, help="patch side, px")
    parser.add_argument("--stride", type=int, default=Settings.stride, help="grid stride, px")
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--train-patches", type=int, default=Settings.train_patches)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default=Settings.likelihood)
    parser.add_argument("--gaussian-scale", type=float, default=Settings.gaussian_scale, help="σ of the Gaussian")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _argv(argv)
    settings = Settings(
        patch=args.patch,
        stride=args.stride,
        epochs=args.epochs,
        train_patches=args.train_patches,
        seed=args.seed,
        likelihood=args.likelihood,
        gaussian_scale=args.gaussian_scale,
    )
    try:
        frame = load_frame(args.data)
    except DataMissingError as exc:
        print(f"real_data.py: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    left, right, split = split_halves(frame)
    marks = np.asarray([m for m in MARKED_DEFECTS if m[0] < frame.shape[0] and m[1] < frame.shape[1]], np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        run = run_config(settings, data_config(settings, str(args.data)), progress=args.progress)
        t0 = time.perf_counter()
        result, patches = train_half(left, run, work / "run", max_patches=settings.train_patches, seed=settings.seed)
        t_train = time.perf_counter() - t0
        offline = encode_images(result.model, patches.images)
        left_centres = patches.positions[:, 1:] + (settings.patch - 1) / 2
        left_marks = marks[marks[:, 1] < split]
        roles = name_classes(offline["class_prob"], left_centres, left_marks, settings.mark_radius)
        named = export_named(result, run, patches, roles, work / "artifact")
        streamed = [stream_half(work / "artifact", left, 0), stream_half(work / "artifact", right, split)]
        # live equals offline: the ONNX stream of the training half must reproduce the Pyro model's encoding
        diff = float(np.abs(streamed[0].maps.arrays["z"].reshape(-1, 2) - offline["z"]).max())
        agree = float((streamed[0].maps.arrays["class"].reshape(-1) == offline["class_prob"].argmax(1)).mean())
        out = args.out
        figures = [
            *plot_overview(frame, streamed, roles, marks, out),
            plot_unseen(frame, streamed[1], roles, marks, out),
            plot_class_examples(patches, offline, roles, out),
            plot_training(result, out),
            _shrink(plot_traversals(result.model, named.model, out / "traversals-z0.png", dim=0, n_steps=7)),
            _shrink(plot_traversals(result.model, named.model, out / "traversals-z1.png", dim=1, n_steps=7)),
        ]
    summary: dict[str, object] = {
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "frame": list(frame.shape),
        "split_x": split,
        "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "final_epoch": result.history[-1],
        "roles": dict(zip(ROLES, roles, strict=False)),
        "stream_vs_offline": {"max_abs_z_diff": diff, "class_agreement": agree},
    }
    for name, half, part in (("train_half", streamed[0], "left"), ("unseen_half", streamed[1], "right")):
        prob = half.maps.arrays["class_prob"].reshape(-1, 3)
        z = half.maps.arrays["z"].reshape(-1, 2)
        centres = _grid_centres(half.maps, half.x_offset)
        m = marks[(marks[:, 1] < split) if part == "left" else (marks[:, 1] >= split)]
        enrich, cover = mark_scores(prob, centres, m, settings.mark_radius)
        d = np.min(np.hypot(centres[:, None, 0] - m[None, :, 0], centres[:, None, 1] - m[None, :, 1]), axis=1)
        near = d <= settings.mark_radius
        found = [
            bool(any(np.hypot(r.y - y, r.x + half.x_offset - x) <= 2 * settings.mark_radius for r in half.maps.defects))
            for y, x in m
        ]
        summary[name] = {
            "patches": int(prob.shape[0]),
            "grid": list(half.maps.grid or ()),
            "stream_seconds": round(half.seconds, 2),
            "class_fractions": {ROLES[r]: round(float((prob.argmax(1) == k).mean()), 4) for r, k in enumerate(roles)},
            "near_mark_share_of_class": {ROLES[r]: round(float(enrich[k]), 3) for r, k in enumerate(roles)},
            "class_share_near_marks": {ROLES[r]: round(float(cover[k]), 3) for r, k in enumerate(roles)},
            "marks": len(m),
            "marks_with_reported_region": int(sum(found)),
            "reported_regions": len(half.maps.defects),
            "mean_abs_z_near_marks": [round(float(v), 3) for v in np.abs(z[near]).mean(0)] if near.any() else None,
            "mean_abs_z_elsewhere": [round(float(v), 3) for v in np.abs(z[~near]).mean(0)],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("figures: " + ", ".join(p.name for p in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
