"""The figures people look at (PAPER.md, "What people look at"), each written to a PNG whose path is returned.

The decoded image grids are computed by plain functions (``traversal_images``, ``manifold_images``,
``conditioned_images``) that return arrays, so their layout is testable without reading pixels; the ``plot_*``
functions only draw. matplotlib is imported inside the functions, with the Agg backend, so importing this module
costs nothing and needs no display. Decoding runs under ``torch.inference_mode`` and never changes the model.

Latent values sweep the inverse Gaussian CDF of an even grid (``norm.ppf(linspace(0.05, 0.95, n))``), so equal steps
along a row are equal steps of prior probability mass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from models.config import ModelConfig

__all__ = [
    "conditioned_images",
    "latent_grid",
    "manifold_images",
    "plot_conditioned",
    "plot_confusion",
    "plot_manifolds",
    "plot_real_space_maps",
    "plot_traversals",
    "traversal_images",
]


def latent_grid(n: int, *, lo: float = 0.05, hi: float = 0.95) -> np.ndarray:
    """``n`` latent values at the Gaussian quantiles of an even grid on [lo, hi]."""
    return norm.ppf(np.linspace(lo, hi, n))


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _decode(
    model: torch.nn.Module,
    config: ModelConfig,
    z: np.ndarray,
    y: int | None,
    angle: float | None = None,
) -> np.ndarray:
    """Decode latent rows ``z`` (N, D) for class ``y`` at rotation ``angle`` (radians, None: upright), no shift.

    The coordinate decoders are functions of pixel coordinates, so a model trained without the rotation latent can
    still draw a rotated image; the dense decoder cannot (``JTrVAE.generate`` says so).
    """
    device = _model_device(model)
    n = z.shape[0]
    zt = torch.as_tensor(z, dtype=torch.float32, device=device)
    yt = None if config.n_classes == 0 else torch.full((n,), int(y or 0), dtype=torch.long, device=device)
    at = None if angle is None else torch.full((n,), float(angle), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model.generate(zt, yt, at, None)
    finally:
        model.train(was_training)
    return out.detach().to("cpu", torch.float32).numpy()


def _classes(config: ModelConfig) -> list[int | None]:
    return list(range(config.n_classes)) if config.n_classes > 0 else [None]


def traversal_images(model: torch.nn.Module, config: ModelConfig, *, dim: int, n_steps: int = 9) -> np.ndarray:
    """``(rows, n_steps, H, W)``: one row per class (one row when K = 0), latent ``dim`` swept, the others at 0."""
    if not 0 <= dim < config.latent_dim:
        raise ValueError(f"dim={dim} is not a latent dimension; the model has latent_dim={config.latent_dim}")
    z = np.zeros((n_steps, config.latent_dim))
    z[:, dim] = latent_grid(n_steps)
    return np.stack([_decode(model, config, z, y) for y in _classes(config)])


def manifold_images(model: torch.nn.Module, config: ModelConfig, *, n: int = 8) -> np.ndarray:
    """``(classes, n, n, H, W)``: for each class, the decoded grid over latents 0 (columns) and 1 (rows, up)."""
    if config.latent_dim < 2:
        raise ValueError(f"a 2-D manifold needs latent_dim >= 2; the model has {config.latent_dim}")
    values = latent_grid(n)
    zy, zx = np.meshgrid(values[::-1], values, indexing="ij")
    z = np.zeros((n * n, config.latent_dim))
    z[:, 0], z[:, 1] = zx.ravel(), zy.ravel()
    h, w = config.patch
    return np.stack([_decode(model, config, z, y).reshape(n, n, h, w) for y in _classes(config)])


def conditioned_images(
    model: torch.nn.Module, config: ModelConfig, *, angles_deg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images (rows, columns, H, W), angles in degrees)``: class fixed per row, angle per column, z = 0.

    The default angles cover the full turn (0…330° in 30° steps), far outside a ±12° training range on purpose.
    """
    angles = np.arange(0.0, 360.0, 30.0) if angles_deg is None else np.asarray(angles_deg, dtype=np.float64)
    z = np.zeros((1, config.latent_dim))
    rows = [
        np.concatenate([_decode(model, config, z, y, float(np.deg2rad(a))) for a in angles]) for y in _classes(config)
    ]
    return np.stack(rows), angles


def _save(fig: Any, path: str | Path, layout: tuple[int, int]) -> Path:
    """Write the PNG, recording the panel grid (rows×columns) as PNG text so tools and tests can read it back."""
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # tight: long class names on the y axis (a confusion matrix of "diamonds") would otherwise be cut off
    fig.savefig(p, dpi=100, bbox_inches="tight", metadata={"Description": f"panels {layout[0]}x{layout[1]}"})
    plt.close(fig)
    return p


def _figure(rows: int, cols: int, cell: float) -> tuple[Any, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1.2, rows * cell + 0.6), squeeze=False)
    return fig, axes


def _image_grid(images: np.ndarray, row_labels: list[str], col_labels: list[str], title: str, path: str | Path) -> Path:
    rows, cols = images.shape[:2]
    fig, axes = _figure(rows, cols, 1.0)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(images[i, j], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8)
            if i == 0:
                ax.set_title(col_labels[j], fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, (rows, cols))


def _row_names(config: ModelConfig) -> list[str]:
    return list(config.names_of_classes()) if config.n_classes > 0 else ["all"]


def plot_traversals(
    model: torch.nn.Module, config: ModelConfig, path: str | Path, *, dim: int = 0, n_steps: int = 9
) -> Path:
    """One row per class, ``n_steps`` columns sweeping latent ``dim`` (others at 0)."""
    images = traversal_images(model, config, dim=dim, n_steps=n_steps)
    cols = [f"{v:+.2f}" for v in latent_grid(n_steps)]
    return _image_grid(images, _row_names(config), cols, f"{config.variant}: traversal of z{dim}", path)


def plot_manifolds(model: torch.nn.Module, config: ModelConfig, path: str | Path, *, n: int = 8) -> Path:
    """One panel per class: the ``n×n`` decoded grid over (z0, z1), each panel a single montage image."""
    grids = manifold_images(model, config, n=n)
    k, _, _, h, w = grids.shape
    fig, axes = _figure(1, k, 3.0)
    for c in range(k):
        montage = grids[c].transpose(0, 2, 1, 3).reshape(n * h, n * w)
        ax = axes[0, c]
        ax.imshow(montage, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(_row_names(config)[c], fontsize=9)
        ax.set_xlabel("z0 →", fontsize=8)
        ax.set_ylabel("z1 →", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{config.variant}: latent manifold per class", fontsize=10)
    return _save(fig, path, (1, k))


def plot_conditioned(
    model: torch.nn.Module, config: ModelConfig, path: str | Path, *, angles_deg: np.ndarray | None = None
) -> Path:
    """Class per row, rotation angle per column (z = 0, no shift): generation conditioned on class and angle."""
    images, angles = conditioned_images(model, config, angles_deg=angles_deg)
    cols = [f"{a:.0f}°" for a in angles]
    return _image_grid(images, _row_names(config), cols, f"{config.variant}: class- and angle-conditioned", path)


def plot_confusion(confusion: np.ndarray, path: str | Path, *, class_names: tuple[str, ...] | None = None) -> Path:
    """Counts of true label (rows) against matched cluster (columns), annotated."""
    conf = np.asarray(confusion)
    fig, axes = _figure(1, 1, max(3.0, 0.6 * conf.shape[1]))
    ax = axes[0, 0]
    ax.imshow(conf, cmap="Blues")
    for (i, j), v in np.ndenumerate(conf):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8, color="black")
    rows = list(class_names) if class_names is not None else [str(i) for i in range(conf.shape[0])]
    ax.set_yticks(range(conf.shape[0]), rows[: conf.shape[0]])
    ax.set_xticks(range(conf.shape[1]), [f"c{j}" for j in range(conf.shape[1])])
    ax.set_ylabel("true class")
    ax.set_xlabel("matched cluster")
    ax.set_title("confusion after Hungarian matching", fontsize=9)
    return _save(fig, path, (1, 1))


def plot_real_space_maps(
    centres: np.ndarray,
    path: str | Path,
    *,
    frame_shape: tuple[int, int],
    class_prob: np.ndarray | None = None,
    z: np.ndarray | None = None,
    frame: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Class (argmax) and each z dimension drawn at the patches' centres in one frame.

    ``centres`` (N, 2) are ``(y, x)`` frame pixels of this frame's patches. With ``grid`` (gh, gw) the values are shown
    as an image over the covered region; otherwise (atom-centred patches) as dots over ``frame`` when given.
    """
    centres = np.asarray(centres, dtype=np.float64)
    maps: list[tuple[str, np.ndarray, str]] = []
    if class_prob is not None:
        maps.append(("class", np.asarray(class_prob).argmax(axis=1), "tab10"))
    if z is not None:
        zz = np.asarray(z)
        maps.extend((f"z{d}", zz[:, d], "viridis") for d in range(zz.shape[1]))
    if not maps:
        raise ValueError("nothing to map: give class_prob and/or z")
    fig, axes = _figure(1, len(maps), 3.5)
    h, w = frame_shape
    for ax, (name, values, cmap) in zip(axes[0], maps, strict=True):
        if grid is not None:
            ys, xs = np.unique(centres[:, 0]), np.unique(centres[:, 1])
            dy = ys[1] - ys[0] if ys.size > 1 else 1.0
            dx = xs[1] - xs[0] if xs.size > 1 else 1.0
            extent = (xs[0] - dx / 2, xs[-1] + dx / 2, ys[-1] + dy / 2, ys[0] - dy / 2)
            im = ax.imshow(values.reshape(grid), cmap=cmap, extent=extent, interpolation="nearest")
        else:
            if frame is not None:
                ax.imshow(frame, cmap="gray")
            im = ax.scatter(centres[:, 1], centres[:, 0], c=values, cmap=cmap, s=12)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return _save(fig, path, (1, len(maps)))
