"""Figures of ``benchmarks/real_data.py`` for docs/real-data.md: per case, what a microscopist needs to judge the maps.

Three panels per case, all in frame pixels: the frame with the truth marked; the class map over the frame with a
legend naming each class; the defect score (a colour bar in its units: 0.5 is the threshold calibrated on the
training patches) with the published defects marked. Grid maps are drawn as images over their patch centres, atom
maps as coloured dots at the atom centres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_figures"]


def _extent(maps: Any) -> tuple[float, float, float, float]:
    gh, gw = maps.grid
    (sy, sx), (y0, x0), (ph, pw) = maps.stride, maps.origin, maps.patch
    top, left = y0 + (ph - 1) / 2 - sy / 2, x0 + (pw - 1) / 2 - sx / 2
    return (left, left + gw * sx, top + gh * sy, top)


def _draw(ax: Any, maps: Any, values: np.ndarray, **kw: Any) -> Any:
    if maps.layout == "grid":
        return ax.imshow(values, extent=_extent(maps), interpolation="nearest", **kw)
    c = maps.arrays["centers"]
    return ax.scatter(c[:, 1], c[:, 0], c=values, s=14, **kw)


def write_figures(cases: list[Any], out: Path, *, score_kind: str) -> list[Path]:
    """One PNG per case (its name, slugged) in ``out``; returns the paths. ``score_kind`` is the published defect
    score's kind, named in the title even when a frame published nothing."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    out.mkdir(parents=True, exist_ok=True)
    written = []
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    for case in cases:
        fig_data = case.figures
        if not fig_data:
            continue
        frame, maps = fig_data["frame"], fig_data["maps"]
        h, w = frame.shape
        wide = w > 2.5 * h
        fig = Figure(figsize=(14, 9.5) if wide else (18, 6.2), layout="constrained")
        axes = fig.subplots(3, 1) if wide else fig.subplots(1, 3)
        lo, hi = np.percentile(frame, [0.5, 99.5])
        for ax in axes:
            ax.imshow(frame, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_xlabel("x (px)")
            ax.set_ylabel("y (px)")
        truth = fig_data.get("truth")
        if truth is not None and len(truth):
            axes[0].scatter(truth[:, 1], truth[:, 0], s=160, facecolors="none", edgecolors="#00e5ff", linewidths=1.5)
            axes[0].set_title("frame, true defects (cyan circles)")
        elif "substrate" in fig_data:
            c = maps.arrays["centers"]
            sub = fig_data["substrate"]
            axes[0].scatter(c[sub, 1], c[sub, 0], s=10, c="#00e5ff")
            axes[0].set_title("frame; cyan: columns below the measured interface")
        else:
            axes[0].set_title("frame")
        k = maps.n_classes
        cmap = ListedColormap(palette[:k])
        _draw(axes[1], maps, maps.arrays["class"].astype(float), cmap=cmap, vmin=-0.5, vmax=k - 0.5, alpha=0.55)
        shares = np.bincount(maps.arrays["class"].reshape(-1), minlength=k) / maps.arrays["class"].size
        axes[1].legend(
            handles=[Patch(color=palette[i], label=f"{maps.class_names[i]} ({shares[i]:.0%})") for i in range(k)],
            loc="upper right",
            fontsize=8,
            framealpha=0.8,
        )
        axes[1].set_title("class map (argmax); legend: share of patches")
        im = _draw(axes[2], maps, maps.arrays["defect_score"], cmap="magma", vmin=0.0, vmax=1.0, alpha=0.7)
        found = np.array([[d.y, d.x] for d in maps.defects]).reshape(-1, 2)
        if len(found):
            axes[2].scatter(found[:, 1], found[:, 0], marker="x", s=90, c="#39ff14", linewidths=2)
        if truth is not None and len(truth):
            axes[2].scatter(truth[:, 1], truth[:, 0], s=160, facecolors="none", edgecolors="#00e5ff", linewidths=1)
        kind = fig_data.get("score_kind", score_kind)
        axes[2].set_title(f"defect score ({kind}); published defects (×): {len(found)}")
        bar = fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02)
        bar.set_label("s/(1+s), s = score / calibrated threshold\n0.5 (white line) = threshold")
        bar.ax.axhline(0.5, color="white", linewidth=1)
        axes[2].legend(
            handles=[
                Line2D([], [], marker="x", color="#39ff14", linestyle="", label="published defect"),
                Line2D([], [], marker="o", markerfacecolor="none", color="#00e5ff", linestyle="", label="truth"),
            ],
            loc="lower right",
            fontsize=8,
        )
        fig.suptitle(case.name)
        slug = "".join(ch if ch.isalnum() else "-" for ch in case.name.lower()).strip("-")
        path = out / f"{'-'.join(filter(None, slug.split('-')))}.png"
        fig.savefig(path, dpi=70)
        written.append(path)
    return written
