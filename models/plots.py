"""The figures people look at, drawn to be read at a glance, each written to a PNG whose path is returned.

Conventions every figure here keeps, because a microscopist compares them side by side:

* **classes** are categorical: one fixed colour per class (matplotlib's ``tab10``, ``tab20`` past ten), a legend
  with the class *names*, never a continuous colour bar;
* **continuous maps** carry a colour bar with their unit: latents in latent units (posterior mean, diverging map
  centred on 0), rotation in degrees (a cyclic map, so −180° and 180° look the same), defect score from 0 to 1;
* **titles fit**: short titles, ``constrained_layout``, and ``bbox_inches="tight"`` when saving.

The decoded image grids are computed by plain functions (``traversal_images``, ``manifold_images``,
``conditioned_images``) that return arrays, so their layout is testable without reading pixels; the ``*_figure``
functions draw onto a new ``matplotlib.figure.Figure`` (never pyplot: a notebook's state and backend are left alone)
and ``plot_*`` save that figure. Decoding runs under ``torch.inference_mode`` and never changes the model.

Latent values sweep the inverse Gaussian CDF of an even grid (``norm.ppf(linspace(0.05, 0.95, n))``), so equal steps
along a row are equal steps of prior probability mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from models.config import ModelConfig
from models.map_figures import SCALES, class_colours, draw_class_map, draw_scalar_map, grid_extent, save_figure

__all__ = [
    "SCALES",
    "class_colours",
    "conditioned_images",
    "draw_class_map",
    "draw_scalar_map",
    "grid_extent",
    "latent_grid",
    "manifold_images",
    "manifolds_figure",
    "plot_conditioned",
    "plot_confusion",
    "plot_manifolds",
    "plot_real_space_maps",
    "plot_traversals",
    "real_space_maps_figure",
    "save_figure",
    "traversal_images",
    "traversals_figure",
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


# ------------------------------------------------------------------------------------------------ drawing helpers


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _row_names(config: ModelConfig) -> list[str]:
    return list(config.names_of_classes()) if config.n_classes > 0 else ["all classes"]


def _signed(v: float) -> str:
    """A latent value for a tick: one decimal, signed, and 0 as "0" (norm.ppf(0.5) is -1e-17, not "-0.0")."""
    text = f"{v:+.1f}"
    return "0" if text in ("+0.0", "-0.0") else text


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------------------ figures


def traversals_figure(
    model: torch.nn.Module, config: ModelConfig, *, dims: Sequence[int] | None = None, n_steps: int = 9
) -> Any:
    """One block per latent (z0, z1, …), one row per class, ``n_steps`` columns sweeping that latent (others at 0).

    Each row is contrast-stretched to its own range (labelled): an unstretched row of a smooth decoder looks like
    nine identical blobs even when the latent moves columns by a pixel.
    """
    dims = list(range(config.latent_dim)) if dims is None else list(dims)
    blocks = [traversal_images(model, config, dim=d, n_steps=n_steps) for d in dims]
    names = _row_names(config)
    rows = len(names)
    fig = _new_figure(n_steps * 0.75 * len(dims) + 1.6, rows * 0.85 + 1.1)
    subfigs = fig.subfigures(1, len(dims), squeeze=False)[0]
    steps = latent_grid(n_steps)
    for sub, d, images in zip(subfigs, dims, blocks, strict=True):
        axes = sub.subplots(rows, n_steps, squeeze=False)
        for i in range(rows):
            lo, hi = float(images[i].min()), float(images[i].max())
            for j in range(n_steps):
                ax = axes[i, j]
                ax.imshow(images[i, j], cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
                _bare(ax)
                if j == 0:
                    ax.set_ylabel(names[i], fontsize=8)
                if i == rows - 1:
                    ax.set_xlabel(_signed(steps[j]), fontsize=7)
        sub.suptitle(f"z{d} swept (others 0)", fontsize=10)
    fig.suptitle(f"{config.variant} decoder: latent traversals (grey range stretched per row)", fontsize=10)
    return fig


def plot_traversals(
    model: torch.nn.Module, config: ModelConfig, path: str | Path, *, dim: int | None = None, n_steps: int = 9
) -> Path:
    """``traversals_figure`` for latent ``dim`` (None: every latent, side by side), saved to ``path``."""
    return save_figure(traversals_figure(model, config, dims=None if dim is None else [dim], n_steps=n_steps), path)


def manifolds_figure(model: torch.nn.Module, config: ModelConfig, *, n: int = 8) -> Any:
    """One panel per class: the ``n×n`` decoded grid over (z0 → right, z1 → up), with the latent values on the axes."""
    grids = manifold_images(model, config, n=n)
    k, _, _, h, w = grids.shape
    cols = min(k, 4)
    rows = -(-k // cols)
    fig = _new_figure(cols * 3.2, rows * 3.4 + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    values = latent_grid(n)
    ticks = list(range(n)) if n <= 9 else [0, n // 2, n - 1]
    for c in range(rows * cols):
        ax = axes[c // cols, c % cols]
        if c >= k:
            ax.set_axis_off()
            continue
        montage = grids[c].transpose(0, 2, 1, 3).reshape(n * h, n * w)
        ax.imshow(montage, cmap="gray", extent=(-0.5, n - 0.5, -0.5, n - 0.5))
        for edge in np.arange(0.5, n - 1):  # thin lines between the decoded tiles, so each reads as one patch
            ax.axvline(edge, color="#4a90d9", lw=0.6)
            ax.axhline(edge, color="#4a90d9", lw=0.6)
        ax.set_title(_row_names(config)[c], fontsize=10, color=class_colours(k)[c])
        ax.set_xticks(ticks, [_signed(values[t]) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [_signed(values[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("z0", fontsize=8)
        ax.set_ylabel("z1", fontsize=8)
    fig.suptitle(f"{config.variant}: decoded latent manifold of each class", fontsize=10)
    return fig


def plot_manifolds(model: torch.nn.Module, config: ModelConfig, path: str | Path, *, n: int = 8) -> Path:
    """``manifolds_figure`` saved to ``path``."""
    return save_figure(manifolds_figure(model, config, n=n), path)


def plot_conditioned(
    model: torch.nn.Module, config: ModelConfig, path: str | Path, *, angles_deg: np.ndarray | None = None
) -> Path:
    """Class per row, rotation angle per column (z = 0, no shift): generation conditioned on class and angle."""
    images, angles = conditioned_images(model, config, angles_deg=angles_deg)
    names = _row_names(config)
    rows, cols = images.shape[:2]
    fig = _new_figure(cols * 0.8 + 1.0, rows * 0.85 + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            axes[i, j].imshow(images[i, j], cmap="gray", vmin=0.0, vmax=1.0)
            _bare(axes[i, j])
            if j == 0:
                axes[i, j].set_ylabel(names[i], fontsize=8)
            if i == rows - 1:
                axes[i, j].set_xlabel(f"{angles[j]:.0f}°", fontsize=7)
    fig.suptitle(f"{config.variant}: generated at each class (rows) and angle (columns)", fontsize=10)
    return save_figure(fig, path)


def plot_confusion(confusion: np.ndarray, path: str | Path, *, class_names: tuple[str, ...] | None = None) -> Path:
    """Counts of true label (rows) against matched cluster (columns), annotated (white on dark cells)."""
    conf = np.asarray(confusion)
    side = max(3.0, 0.6 * conf.shape[1] + 1.5)
    fig = _new_figure(side, side)
    ax = fig.subplots()
    ax.imshow(conf, cmap="Blues")
    dark = conf.max() / 2 if conf.size else 0
    for (i, j), v in np.ndenumerate(conf):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8, color="white" if v > dark else "black")
    rows = list(class_names) if class_names is not None else [str(i) for i in range(conf.shape[0])]
    ax.set_yticks(range(conf.shape[0]), rows[: conf.shape[0]])
    ax.set_xticks(range(conf.shape[1]), [f"c{j}" for j in range(conf.shape[1])])
    ax.set_ylabel("true class")
    ax.set_xlabel("matched cluster")
    ax.set_title("confusion after Hungarian matching", fontsize=9)
    return save_figure(fig, path)


def real_space_maps_figure(
    centres: np.ndarray,
    *,
    frame_shape: tuple[int, int],
    class_prob: np.ndarray | None = None,
    z: np.ndarray | None = None,
    angle: np.ndarray | None = None,
    defect_score: np.ndarray | None = None,
    frame: np.ndarray | None = None,
    grid: tuple[int, int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Any:
    """Class (categorical, legend), each latent, rotation (degrees) and defect score at the patches of one frame.

    ``centres`` (N, 2) are ``(y, x)`` frame pixels of this frame's patches; ``angle`` is in radians (as served).
    With ``grid`` (gh, gw) the values are drawn as an image over the covered region; otherwise (atom-centred
    patches) as dots, over ``frame`` when given.
    """
    centres = np.asarray(centres, dtype=np.float64)
    panels: list[tuple[str, np.ndarray, str]] = []
    if class_prob is not None:
        panels.append(("class", np.asarray(class_prob).argmax(axis=1), "class"))
    if z is not None:
        zz = np.asarray(z)
        panels.extend((f"latent z{d}", zz[:, d], "z") for d in range(zz.shape[1]))
    if angle is not None:
        panels.append(("rotation", np.degrees(np.angle(np.exp(1j * np.asarray(angle, dtype=np.float64)))), "angle"))
    if defect_score is not None:
        panels.append(("defect score", np.asarray(defect_score), "defect_score"))
    if not panels:
        raise ValueError("nothing to map: give class_prob, z, angle and/or defect_score")
    h, w = frame_shape
    cols = len(panels) if len(panels) <= 4 else 3
    rows = -(-len(panels) // cols)
    fig = _new_figure(cols * 3.9, rows * 3.4 * h / max(w, 1) + 0.7 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    extent = None
    if grid is not None:
        ys, xs = np.unique(centres[:, 0]), np.unique(centres[:, 1])
        dy = ys[1] - ys[0] if ys.size > 1 else 1.0
        dx = xs[1] - xs[0] if xs.size > 1 else 1.0
        extent = (xs[0] - dx / 2, xs[-1] + dx / 2, ys[-1] + dy / 2, ys[0] - dy / 2)
    for k in range(rows * cols):
        ax = axes[k // cols, k % cols]
        if k >= len(panels):
            ax.set_axis_off()
            continue
        title, values, kind = panels[k]
        if frame is not None and grid is None:
            ax.imshow(frame, cmap="gray")
        where = {"extent": extent} if grid is not None else {"centres": centres}
        shaped = values.reshape(grid) if grid is not None else values
        if kind == "class":
            n = np.asarray(class_prob).shape[1]
            names = list(class_names) if class_names is not None else [f"class {c}" for c in range(n)]
            draw_class_map(ax, shaped, names, **where)
        else:
            draw_scalar_map(fig, ax, shaped, kind, **where)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(title, fontsize=10)
        _bare(ax)
    return fig


def plot_real_space_maps(centres: np.ndarray, path: str | Path, **kwargs: Any) -> Path:
    """``real_space_maps_figure(centres, **kwargs)`` saved to ``path``."""
    return save_figure(real_space_maps_figure(centres, **kwargs), path)
