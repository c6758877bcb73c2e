"""Defect scores of patches and defects as connected regions of flagged patches.

**Score** (``defect_score``, float32 in [0, 1], one per patch):

* with defect classes configured: the probability mass the encoder puts on those classes,
  ``sum_{k in defect classes} p_k`` — a calibrated "how likely is this patch a defect";
* without: the normalised entropy of the class distribution, ``H(p) / log K`` — patches the model cannot place in
  any class it learned (an unknown defect looks like nothing it has seen). ``K < 2`` gives 0.

**Flagged** patches are those whose argmax class is a defect class, or whose score is at least the threshold.

**Regions** group flagged patches that touch:

* grid layout: 8-connectivity by default (diagonal neighbours join, so a defect line at 45° stays one region);
  4-connectivity on request;
* points layout (atom-centred patches, no grid): two flagged atoms join when their centres are at most
  ``LINK_FACTOR`` × the median nearest-neighbour distance of all atoms in the frame apart — the lattice analogue of
  8-connectivity (nearest and next-nearest neighbours of a square lattice are 1 and √2 spacings away).

Each region is reported once: centroid ``(y, x)`` in frame pixels (the score-weighted mean of its patch centres —
for the grid layout a patch's centre is its geometric centre ``(y0 + i·sy + (ph-1)/2, x0 + j·sx + (pw-1)/2)``), area
in patches, the majority class (ties go to the lower index) and the largest score.

Everything here is plain numpy on small per-frame arrays (a grid of a few thousand cells), so it runs on the CPU
after the encoder outputs have been copied back once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from streamer.protocol import Defect

__all__ = [
    "LINK_FACTOR",
    "Connectivity",
    "DefectRule",
    "defect_mask",
    "defect_score",
    "grid_centres",
    "grid_regions",
    "point_regions",
    "regions_to_defects",
]

Connectivity = Literal[4, 8]
LINK_FACTOR = 1.5

_NEIGHBOURS: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


@dataclass(frozen=True)
class DefectRule:
    """Which patches are defects: class indices, a score threshold, and how flagged grid cells connect."""

    classes: tuple[int, ...] = ()
    threshold: float = 0.5
    connectivity: Connectivity = 8


def defect_score(class_prob: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``(..., K)`` class probabilities → ``(...)`` defect score (see the module docstring for which score)."""
    p = np.asarray(class_prob, dtype=np.float32)
    if classes:
        return np.clip(p[..., list(classes)].sum(axis=-1), 0.0, 1.0).astype(np.float32)
    k = p.shape[-1]
    if k < 2:
        return np.zeros(p.shape[:-1], dtype=np.float32)
    safe = np.clip(p, 1e-12, 1.0)
    entropy = -(p * np.log(safe)).sum(axis=-1) / np.log(k)
    return np.clip(entropy, 0.0, 1.0).astype(np.float32)


def defect_mask(cls: np.ndarray, score: np.ndarray, rule: DefectRule) -> np.ndarray:
    """Flagged patches: argmax class among the defect classes, or score at least the threshold."""
    mask = score >= rule.threshold
    if rule.classes:
        mask |= np.isin(cls, np.asarray(rule.classes))
    return mask


def grid_regions(mask: np.ndarray, connectivity: Connectivity = 8) -> tuple[np.ndarray, int]:
    """Connected regions of a 2-D boolean grid: ``(labels, n)``, labels ``-1`` off the mask, else ``0..n-1``.

    Regions are numbered in row-major order of their first cell. Vectorised over runs rather than cells, because an
    untrained or unsure model flags most of the grid and a cell-by-cell search then cost more than the encoder: the
    flagged cells of each row form runs; runs in neighbouring rows that touch (overlap, or meet at a corner with
    8-connectivity) are joined by label propagation over run pairs; the labels are then painted back onto the cells.
    """
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity={connectivity!r} must be 4 or 8")
    mask = np.asarray(mask, dtype=bool)
    gh, gw = mask.shape
    labels = np.full((gh, gw), -1, dtype=np.int64)
    # runs: edges of the padded rows, row-major; a run is [start, stop) in row `rows`
    padded = np.zeros((gh, gw + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))
    if rows.size == 0:
        return labels, 0
    run_row, starts, stops = rows[0::2], cols[0::2], cols[1::2]
    n_runs = run_row.size
    # run pairs that touch: for each run b, the runs a of the row above with start_a < stop_b + reach and
    # stop_a + reach > start_b form one contiguous range of run indices (runs of a row are sorted and disjoint)
    reach = 1 if connectivity == 8 else 0
    width = gw + 2
    start_key = run_row * width + starts
    stop_key = run_row * width + stops
    above = run_row - 1
    first = np.searchsorted(stop_key, above * width + starts - reach, side="right")
    last = np.searchsorted(start_key, above * width + stops + reach, side="left") - 1
    count = np.maximum(last - first + 1, 0)
    b = np.repeat(np.arange(n_runs), count)
    a = np.repeat(first - np.cumsum(count) + count, count) + np.arange(int(count.sum()))
    root = _components(n_runs, a, b)
    _, region = np.unique(root, return_inverse=True)  # smallest run index first = row-major order of first cells
    labels[mask] = np.repeat(region.reshape(-1), stops - starts)
    return labels, int(region.max()) + 1


def point_regions(mask: np.ndarray, centres: np.ndarray, *, link_factor: float = LINK_FACTOR) -> tuple[np.ndarray, int]:
    """Regions of flagged atoms: ``(labels (N,), n)``; atoms join within ``link_factor`` × median NN distance.

    Regions are numbered in the order of their first flagged atom. Neighbours are found through a grid of cells as
    wide as the distance sought (a point meets only the 3×3 cells around its own), so a frame of thousands of atoms
    costs about as many distances as atoms, not their square (a full distance matrix took 4 s for 8,000 atoms).
    """
    n_all = centres.shape[0]
    labels = np.full(n_all, -1, dtype=np.int64)
    flagged = np.nonzero(mask)[0]
    if flagged.size == 0:
        return labels, 0
    pts = centres.astype(np.float64).reshape(n_all, 2)
    if n_all >= 2:
        link = link_factor * float(np.median(_nearest_distances(pts)))
        sub = pts[flagged]
        a, b, d = _pairs_within(sub, link)
        near = d <= link
        a, b = a[near], b[near]
    else:
        a = b = np.zeros(0, dtype=np.int64)
    root = _components(flagged.size, a, b)
    _, local = np.unique(root, return_inverse=True)  # smallest flagged index first = order of first atoms
    labels[flagged] = local.reshape(-1)
    return labels, int(local.max()) + 1


def _distance(pts: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.sqrt(((pts[i] - pts[j]) ** 2).sum(-1))


def _pairs_within(pts: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of points in the same or neighbouring cells of a grid ``radius`` wide — a superset of
    the pairs at most ``radius`` apart — and their distances."""
    n = pts.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, np.zeros(0)
    width = radius if radius > 0 else 1.0  # radius 0: only coincident points, which share a cell anyway
    cells = np.floor((pts - pts.min(axis=0)) / width).astype(np.int64)
    ncol = int(cells[:, 1].max()) + 3
    key = (cells[:, 0] + 1) * ncol + (cells[:, 1] + 1)  # margins: a neighbour's key is never negative
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    firsts, seconds = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            other = key + dy * ncol + dx
            lo = np.searchsorted(sorted_key, other, side="left")
            count = np.searchsorted(sorted_key, other, side="right") - lo
            firsts.append(np.repeat(np.arange(n), count))
            seconds.append(order[np.repeat(lo - np.cumsum(count) + count, count) + np.arange(int(count.sum()))])
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    keep = i < j
    i, j = i[keep], j[keep]
    return i, j, _distance(pts, i, j)


def _nearest_distances(pts: np.ndarray) -> np.ndarray:
    """Each point's distance to its nearest other point (``n >= 2``), exactly as a full distance matrix gives it.

    Pairs within a cell grid about one mean spacing wide settle most points; a point with no other that close has
    its nearest found against all points, a chunk of such points at a time.
    """
    n = pts.shape[0]
    extent = np.ptp(pts, axis=0)
    spacing = float(np.sqrt(max(float(extent[0] * extent[1]), float(extent.max()) ** 2 / n, 1e-12) / n))
    radius = 1.5 * spacing
    i, j, d = _pairs_within(pts, radius)
    nearest = np.full(n, np.inf)
    np.minimum.at(nearest, i, d)
    np.minimum.at(nearest, j, d)
    unsure = np.nonzero(nearest > radius)[0]  # its nearest may sit beyond the neighbouring cells
    for start in range(0, unsure.size, 1024):
        rows = unsure[start : start + 1024]
        d_rows = np.sqrt(((pts[rows, None, :] - pts[None, :, :]) ** 2).sum(-1))
        d_rows[np.arange(rows.size), rows] = np.inf
        nearest[rows] = d_rows.min(axis=1)
    return nearest


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by the edges ``a[k]``–``b[k]``: each node's smallest node index
    in its component. Each round hooks every root onto the smallest root it touches, then jumps pointers until each
    node points at its root; labels only decrease, so this ends, in a few rounds for the shapes regions take."""
    root = np.arange(n)
    while a.size:
        low = np.minimum(root[a], root[b])
        new = root.copy()
        np.minimum.at(new, root[a], low)
        np.minimum.at(new, root[b], low)
        new = new[new]
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, root):
            break
        root = new
    return root


def grid_centres(
    grid: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int], origin: tuple[int, int]
) -> np.ndarray:
    """``(gh, gw, 2)`` float32: the geometric centre (y, x) in frame pixels of every grid patch."""
    gh, gw = grid
    ys = origin[0] + np.arange(gh) * stride[0] + (patch[0] - 1) / 2.0
    xs = origin[1] + np.arange(gw) * stride[1] + (patch[1] - 1) / 2.0
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy, xx], axis=-1).astype(np.float32)


def regions_to_defects(
    labels: np.ndarray, n: int, centres: np.ndarray, cls: np.ndarray, score: np.ndarray
) -> list[Defect]:
    """One ``Defect`` per region label ``0..n-1``; ``centres`` is ``labels.shape + (2,)``."""
    flat_labels = labels.reshape(-1)
    flat_centres = centres.reshape(-1, 2).astype(np.float64)
    flat_cls = cls.reshape(-1).astype(np.int64)
    flat_score = score.reshape(-1).astype(np.float64)
    # the cells of each region as one slice of a stable sort (row-major within a region), not a scan per region
    cells = np.nonzero(flat_labels >= 0)[0]
    cells = cells[np.argsort(flat_labels[cells], kind="stable")]
    bounds = np.searchsorted(flat_labels[cells], np.arange(n + 1))
    defects: list[Defect] = []
    for region in range(n):
        idx = cells[bounds[region] : bounds[region + 1]]
        w = flat_score[idx]
        pts = flat_centres[idx]
        centroid = (w[:, None] * pts).sum(axis=0) / w.sum() if w.sum() > 0 else pts.mean(axis=0)
        majority = int(np.bincount(flat_cls[idx]).argmax())
        defects.append(
            Defect(
                y=float(centroid[0]),
                x=float(centroid[1]),
                class_=majority,
                score=float(w.max()),
                area=int(idx.size),
            )
        )
    return defects
