"""The atom centres a run's finder picks, drawn on the frame, so a user can check them before trusting any map.

Atom-centred patches are only as good as their centres: a finder that picks both sublattices, misses columns or
lands between them makes classes about the finder, not the sample. One figure answers that at a glance — the frame
in grey, each centre a small marker at its sub-pixel position, and a zoomed corner where single columns show.

Drawn on a ``matplotlib.figure.Figure`` (never pyplot state), so a notebook's pyplot is left alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_atom_centres"]


def plot_atom_centres(
    frame: np.ndarray, centres: np.ndarray, path: str | Path, *, title: str = "", zoom: int = 96,
    what: str = "atom centres",
) -> Path:  # fmt: skip
    """Write a PNG: the whole ``frame`` with ``centres`` ((N, 2) y, x) marked, and a ``zoom``-pixel corner enlarged;
    ``what`` names the centres in the title (unit-cell centres sit between the columns, which a reader must know)."""
    from matplotlib.figure import Figure

    img = np.asarray(frame, np.float64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    pts = np.asarray(centres, np.float64).reshape(-1, 2)
    h, w = img.shape
    cy, cx = h // 2, w // 2
    half = min(zoom, h, w) // 2
    y0, x0 = max(0, cy - half), max(0, cx - half)
    y1, x1 = min(h, y0 + 2 * half), min(w, x0 + 2 * half)
    wide = w > 2 * h  # a wide strip reads better above its zoom than beside it
    fig = Figure(figsize=(12, 9) if wide else (12, 6))
    whole, near = fig.subplots(2, 1, height_ratios=(1, 2)) if wide else fig.subplots(1, 2)
    for ax, (ya, yb, xa, xb), size in ((whole, (0, h, 0, w), 4), (near, (y0, y1, x0, x1), 40)):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.scatter(pts[:, 1], pts[:, 0], s=size, marker="+", c="#ff3030", linewidths=1)
        ax.set_xlim(xa - 0.5, xb - 0.5)
        ax.set_ylim(yb - 0.5, ya - 0.5)
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
    whole.set_title(f"{title} {len(pts)} {what} (+)".strip())
    whole.add_patch(_box(x0, y0, x1 - x0, y1 - y0))
    near.set_title(f"zoom: rows {y0}–{y1}, columns {x0}–{x1} (yellow box)")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    return p


def _box(x: float, y: float, width: float, height: float) -> object:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), width, height, fill=False, edgecolor="yellow", linewidth=1)
