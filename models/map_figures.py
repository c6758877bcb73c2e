"""Drawing conventions shared by every map figure (``models.plots``, the demo, ``atomstream watch``): classes in
categorical colours with a legend of names, continuous maps with a colour bar and unit, cells placed on the frame's
pixel grid the way the service places them. numpy and matplotlib only (no torch, no scipy), so a serving install
with matplotlib can draw maps too; everything draws on the axes it is given and touches no pyplot state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCALES", "class_colours", "draw_class_map", "draw_scalar_map", "grid_extent", "save_figure"]

#: colour map, value range and colour-bar label of each kind of continuous map
SCALES: dict[str, tuple[str, float | None, float | None, str]] = {
    "z": ("RdBu_r", None, None, "latent units (posterior mean)"),
    "angle": ("twilight", -180.0, 180.0, "rotation (degrees)"),
    "defect_score": ("magma", 0.0, 1.0, "defect score (0–1)"),
}


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG (parents created); ``tight`` so long class names and titles are never cut off."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi, bbox_inches="tight", facecolor="white")
    return p


def class_colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct categorical colours, the same for class k in every figure (tab10, then tab20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(n)]


def grid_extent(
    grid: Sequence[int], patch: Sequence[int], stride: Sequence[int], origin: Sequence[int] = (0, 0)
) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) in frame pixels of a patch grid, each cell centred on its patch's
    centre ``origin + i·stride + (patch−1)/2`` — where the service puts defect centroids too."""
    (gh, gw), (ph, pw), (sy, sx), (y0, x0) = grid, patch, stride, origin
    top, left = y0 + (ph - 1) / 2 - sy / 2, x0 + (pw - 1) / 2 - sx / 2
    return (left, left + gw * sx, top + gh * sy, top)


def draw_class_map(
    ax: Any,
    classes: np.ndarray,
    class_names: Sequence[str],
    *,
    extent: tuple[float, float, float, float] | None = None,
    alpha: float = 1.0,
    legend: bool = True,
    centres: np.ndarray | None = None,
) -> None:
    """Classes in categorical colours with a legend of names and shares; a grid (image) or points (``centres``)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    k = len(class_names)
    colours = class_colours(k)
    cmap, bounds = ListedColormap(colours), BoundaryNorm(np.arange(-0.5, k + 0.5), k)
    values = np.asarray(classes)
    if centres is None:
        ax.imshow(values, cmap=cmap, norm=bounds, extent=extent, alpha=alpha, interpolation="nearest")
    else:
        ax.scatter(centres[:, 1], centres[:, 0], c=values, cmap=cmap, norm=bounds, s=14, alpha=alpha)
    if legend:
        share = np.bincount(values.reshape(-1).astype(np.int64), minlength=k) / max(values.size, 1)
        handles = [Patch(facecolor=colours[c], label=f"{class_names[c]} ({share[c]:.0%})") for c in range(k)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.02), ncol=min(k, 3), fontsize=8,
                  frameon=False, handlelength=1.0, columnspacing=1.0)  # fmt: skip


def draw_scalar_map(
    fig: Any,
    ax: Any,
    values: np.ndarray,
    kind: str,
    *,
    extent: tuple[float, float, float, float] | None = None,
    centres: np.ndarray | None = None,
) -> None:
    """A continuous map (``kind`` in ``SCALES``: z, angle in degrees, defect_score) with its colour bar and unit.

    Latent maps use a range symmetric about 0 at the 99th percentile of |z|, so one outlier does not wash them out.
    """
    cmap, vmin, vmax, label = SCALES[kind]
    v = np.asarray(values, dtype=np.float64)
    if vmin is None or vmax is None:
        finite = np.abs(v[np.isfinite(v)])
        m = float(np.percentile(finite, 99)) if finite.size else 1.0
        vmin, vmax = -max(m, 1e-6), max(m, 1e-6)
    if centres is None:
        im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
    else:
        im = ax.scatter(centres[:, 1], centres[:, 0], c=v, cmap=cmap, vmin=vmin, vmax=vmax, s=14)
    bar = fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if kind == "angle":
        bar.set_ticks([-180, -90, 0, 90, 180])
