"""The B-column displacement of a perovskite HAADF frame (its polarisation signal), measured independently of the model.

``benchmarks/real_data.py`` asks whether the model's latent z explains this displacement; the truth must not come
from the pipeline's own finder, whose centres of mass are biased towards bright neighbours and which, on the
PbTiO₃/SrRuO₃ scan, misses many dim Ti columns and keeps both sublattices in part of the film. So:

1. **Which column is which, from geometry.** The columns of a perovskite projected along [100] form a centred square
   lattice: a column's nearest neighbours (at d/√2) are of the other sublattice, its next nearest (at d) of its own.
   Those two kinds of pair are a signed graph, coloured by a breadth-first walk; the brighter colour (mean intensity
   of the frame at its columns) is A. The finder's columns only seed this.
2. **Every position from a 2-D Gaussian fit** (``models.column_fit``, all columns at once, neighbours subtracted):
   the A columns, and one B column at each cell centre of the A lattice — so a B column the finder missed is still
   measured, and one it found is fitted from the lattice's guess, not from the finder's centre.
3. **The displacement at a patch centre** is the local B-inside-A offset: on an A column, the centroid of its 4
   nearest B columns minus itself; on a B column, itself minus the centroid of its 4 nearest A columns. Both are
   the same physical vector (zero for a centred B column), so a patch set centred on both sublattices gets one
   consistent truth.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from models.column_fit import fit_columns  # noqa: E402
from streamer.maps.atoms import cell_centres  # noqa: E402

__all__ = [
    "Displacement",
    "a_sublattice",
    "b_displacement",
    "displacement_figure",
    "main",
    "neighbour_agreement",
]


@dataclass(frozen=True)
class Displacement:
    """Per patch centre: ``vector`` (N, 2) (dy, dx) px, ``ok`` (4 neighbours found, all five fits sound), ``on_a``
    (the centre is an A column; else B). ``a``, ``b``: the fitted columns of the frame, for plots."""

    vector: np.ndarray
    ok: np.ndarray
    on_a: np.ndarray
    a: np.ndarray
    b: np.ndarray


def a_sublattice(frame: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, float]:
    """``(is_a (N,) bool, d)``: which of ``columns`` (N, 2) lie on the brighter sublattice of a centred square
    lattice, and its spacing d, from the signed neighbour graph (module docstring, step 1)."""
    tree = cKDTree(columns)
    half = float(np.median(tree.query(columns, k=2)[0][:, 1]))  # nearest neighbours: the other sublattice, d/√2
    pairs = tree.query_pairs(1.2 * np.sqrt(2) * half, output_type="ndarray")
    r = np.hypot(*(columns[pairs[:, 0]] - columns[pairs[:, 1]]).T)
    other = np.abs(r - half) < 0.15 * half
    same = np.abs(r - np.sqrt(2) * half) < 0.1 * np.sqrt(2) * half
    edges, flip = pairs[other | same], other[other | same]
    neighbours: list[list[tuple[int, bool]]] = [[] for _ in range(len(columns))]
    for (i, j), f in zip(edges, flip, strict=True):
        neighbours[i].append((int(j), bool(f)))
        neighbours[j].append((int(i), bool(f)))
    colour = np.full(len(columns), -1)
    component = np.full(len(columns), -1)
    for start in range(len(columns)):
        if colour[start] >= 0:
            continue
        colour[start], component[start] = 0, start
        queue = deque([start])
        while queue:
            i = queue.popleft()
            for j, f in neighbours[i]:
                if colour[j] < 0:  # the first colouring wins where a false column makes an odd cycle
                    colour[j], component[j] = colour[i] ^ int(f), start
                    queue.append(j)
    pix = np.clip(np.round(columns).astype(int), 0, np.array(frame.shape) - 1)
    value = frame[pix[:, 0], pix[:, 1]]
    is_a = np.zeros(len(columns), bool)
    for c in np.unique(component):
        sel = component == c
        brighter = int(value[sel & (colour == 1)].mean() > value[sel & (colour == 0)].mean()) if sel.sum() > 1 else 0
        is_a[sel] = colour[sel] == brighter
    return is_a, float(np.sqrt(2) * half)


def b_displacement(frame: np.ndarray, columns: np.ndarray, centres: np.ndarray) -> Displacement:
    """The B-inside-A displacement at each of ``centres`` (N, 2) (patch centres, each on a column), from the
    ``columns`` a finder found in ``frame`` (module docstring)."""
    frame = np.asarray(frame, np.float64)
    columns = np.asarray(columns, np.float64).reshape(-1, 2)
    is_a, spacing = a_sublattice(frame, columns)
    a = columns[is_a]
    b = cell_centres(a, spacing)
    b = b[(b >= 0).all(axis=1) & (b <= np.array(frame.shape) - 1).all(axis=1)]
    fits = fit_columns(frame, np.concatenate([a, b]), radius=max(2, round(0.3 * spacing)), sigma=spacing / 8)
    fa, fb = fits.positions[: len(a)], fits.positions[len(a) :]
    ok_a, ok_b = fits.ok[: len(a)], fits.ok[len(a) :]
    da, ia = cKDTree(a).query(centres, k=1)
    db, ib = cKDTree(b).query(centres, k=1)
    on_a = da <= db
    d4_b, i4_b = cKDTree(b).query(centres, k=4)
    d4_a, i4_a = cKDTree(a).query(centres, k=4)
    around_a = fb[i4_b].mean(axis=1) - fa[ia]
    around_b = fb[ib] - fa[i4_a].mean(axis=1)
    vector = np.where(on_a[:, None], around_a, around_b)
    ok = np.where(
        on_a,
        (d4_b < 0.85 * spacing).all(axis=1) & ok_a[ia] & ok_b[i4_b].all(axis=1),
        (d4_a < 0.85 * spacing).all(axis=1) & ok_b[ib] & ok_a[i4_a].all(axis=1),
    ) & (np.minimum(da, db) < 0.25 * spacing)
    return Displacement(vector=vector, ok=ok, on_a=on_a, a=fa[ok_a], b=fb[ok_b])


def neighbour_agreement(centres: np.ndarray, vector: np.ndarray, radius: float) -> tuple[float, float]:
    """Pearson R (dy, dx) between each measurement and the mean of the others within ``radius``: how smooth the
    measured field is. A polarisation field varies over domains, many cells wide; fit noise is independent from cell
    to cell and gives R near 0. Centres without a neighbour are left out."""
    groups = cKDTree(centres).query_ball_point(centres, radius)
    pairs = [(i, [j for j in g if j != i]) for i, g in enumerate(groups)]
    pairs = [(i, others) for i, others in pairs if others]
    if len(pairs) < 3:
        return float("nan"), float("nan")
    own = vector[[i for i, _ in pairs]]
    around = np.array([vector[others].mean(axis=0) for _, others in pairs])
    r = [float(np.corrcoef(own[:, k], around[:, k])[0, 1]) for k in range(2)]
    return r[0], r[1]


def displacement_figure(
    frame: np.ndarray, centres: np.ndarray, measured: Displacement, *, strips: int = 3, beside: Any = None
) -> Any:
    """The displacement field over the frame (in ``strips`` side-by-side cuts of a wide frame): an arrow per sound
    measurement, 12× its length, coloured by its magnitude in px; red dots mark patch centres on a B column.

    ``beside``: a second field ``(title, vectors (N, 2))`` at the same centres (a model's readout), drawn under each
    strip on the same scale and colours, so the two read arrow by arrow."""
    from matplotlib.figure import Figure

    h, w = frame.shape
    fields = [("measured (2-D Gaussian fits)", measured.vector)] + ([beside] if beside is not None else [])
    fig = Figure(figsize=(9, 4.3 * strips * len(fields)), layout="constrained")
    axes = fig.subplots(strips * len(fields), 1, squeeze=False)[:, 0]
    edges = np.linspace(0, w, strips + 1)
    top = float(np.percentile(np.hypot(*measured.vector[measured.ok].T), 98)) if measured.ok.any() else 1.0
    for i, (x0, x1) in enumerate(pairwise(edges)):
        s = measured.ok & (centres[:, 1] >= x0) & (centres[:, 1] < x1)
        for j, (title, vector) in enumerate(fields):
            ax = axes[i * len(fields) + j]
            ax.imshow(frame, cmap="gray", alpha=0.6)
            arrows = ax.quiver(
                centres[s, 1], centres[s, 0], vector[s, 1], vector[s, 0], np.hypot(*vector[s].T),
                angles="xy", scale_units="xy", scale=1 / 12, cmap="viridis", clim=(0, top), width=0.003,
            )  # fmt: skip
            if beside is None:
                on_b = s & ~measured.on_a
                ax.plot(centres[on_b, 1], centres[on_b, 0], "r.", ms=3)
            ax.set(xlim=(x0, x1), ylim=(h, 0), xlabel="x (px)", ylabel="y (px)")
            if beside is not None:
                ax.set_title(title, fontsize=9, loc="left")
            ax.quiverkey(arrows, 0.93, 0.05, 1.0, "1 px", labelpos="W", coordinates="axes", color="w", labelcolor="w")
            fig.colorbar(arrows, ax=ax, label="|displacement| (px)", fraction=0.02)
    note = " red dot: measured on a B column;" if beside is None and (measured.ok & ~measured.on_a).any() else ""
    fig.suptitle(f"B-column displacement inside the A cell (arrows ×12;{note} colour: length)")
    return fig


def model_readout(run: Path, frame_path: Path, frame: np.ndarray, columns: np.ndarray) -> tuple[Any, ...]:
    """A trained run's z on the frame's patches (cut as the run was trained), the displacement measured at their
    centres, and the cross-validated linear readout of (dy, dx) from z over the sound measurements (zero elsewhere):
    ``(centres, measured, readout, (R dy, R dx), n)``."""
    from models.baselines import cv_predict
    from models.checkpoint import load_run
    from models.data import patches_from_config
    from models.evaluate import encode_images

    model, cfg = load_run(run, device="cpu")
    patches = patches_from_config(frame_path, cfg.data, frames=frame[None])
    z = encode_images(model, patches.images)["z"]
    measured = b_displacement(frame, columns, patches.centres)
    readout = np.zeros_like(measured.vector)
    ok = measured.ok
    if ok.sum() < 10:
        raise SystemExit(f"{run}: only {int(ok.sum())} of its {len(ok)} patch centres measured; a readout needs 10")
    r = []
    for k in range(2):
        readout[ok, k] = cv_predict(z[ok], measured.vector[ok, k])
        r.append(float(np.corrcoef(readout[ok, k], measured.vector[ok, k])[0, 1]))
    return patches.centres, measured, readout, tuple(r), int(ok.sum())


def main(argv: list[str] | None = None) -> int:
    """Measure the displacement at every A column of a frame and draw it: ``python benchmarks/polarisation.py
    --data scan.npy --out field.png`` (the finder's settings are the PbTiO₃ benchmark's)."""
    import argparse

    import torch

    from streamer.maps.atoms import find_atoms

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0] if main.__doc__ else None)
    ap.add_argument("--data", type=Path, required=True, help="one HAADF frame (.npy)")
    ap.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    ap.add_argument(
        "--run",
        type=Path,
        default=None,
        help="a trained run (e.g. --atoms --atom-sublattice cells): draw the cross-validated linear readout of its z "
        "under the measured field, at its own patch centres, and print R",
    )
    args = ap.parse_args(argv)
    frame = np.load(args.data).astype(np.float32)
    columns = find_atoms(torch.from_numpy(frame), sigma=1.5, min_distance=5, threshold=0.2).numpy().astype(np.float64)
    if args.run is not None:
        centres, measured, readout, (r_dy, r_dx), n = model_readout(args.run, args.data, frame, columns)
        title = f"read from z of {args.run.name} (cross-validated linear map; R dy {r_dy:.2f}, dx {r_dx:.2f})"
        displacement_figure(frame, centres, measured, beside=(title, readout)).savefig(args.out, dpi=80)
        print(f"{n} of {len(centres)} patch centres measured; z explains dy at R {r_dy:.3f}, dx at R {r_dx:.3f}")
        return 0
    is_a, _ = a_sublattice(frame.astype(np.float64), columns)
    measured = b_displacement(frame, columns, columns[is_a])
    displacement_figure(frame, columns[is_a], measured).savefig(args.out, dpi=80)
    v = measured.vector[measured.ok]
    print(
        f"{len(v)} of {int(is_a.sum())} A columns measured; mean (dy, dx) {v.mean(0).round(2)}, std {v.std(0).round(2)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
