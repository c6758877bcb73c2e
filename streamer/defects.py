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

from collections import deque
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

    Regions are numbered in row-major order of their first cell. A breadth-first search over flagged cells only:
    defects are sparse, so this visits few cells.
    """
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity={connectivity!r} must be 4 or 8")
    gh, gw = mask.shape
    labels = np.full((gh, gw), -1, dtype=np.int64)
    steps = _NEIGHBOURS[connectivity]
    n = 0
    for i0, j0 in zip(*np.nonzero(mask), strict=True):
        if labels[i0, j0] >= 0:
            continue
        labels[i0, j0] = n
        todo = deque([(int(i0), int(j0))])
        while todo:
            i, j = todo.popleft()
            for di, dj in steps:
                a, b = i + di, j + dj
                if 0 <= a < gh and 0 <= b < gw and mask[a, b] and labels[a, b] < 0:
                    labels[a, b] = n
                    todo.append((a, b))
        n += 1
    return labels, n


def point_regions(mask: np.ndarray, centres: np.ndarray, *, link_factor: float = LINK_FACTOR) -> tuple[np.ndarray, int]:
    """Regions of flagged atoms: ``(labels (N,), n)``; atoms join within ``link_factor`` × median NN distance."""
    n_all = centres.shape[0]
    labels = np.full(n_all, -1, dtype=np.int64)
    flagged = np.nonzero(mask)[0]
    if flagged.size == 0:
        return labels, 0
    pts = centres.astype(np.float64)
    if n_all >= 2:
        d_all = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d_all, np.inf)
        link = link_factor * float(np.median(d_all.min(axis=1)))
        near = d_all[np.ix_(flagged, flagged)] <= link
    else:
        near = np.zeros((1, 1), dtype=bool)
    n = 0
    local = np.full(flagged.size, -1, dtype=np.int64)
    for start in range(flagged.size):
        if local[start] >= 0:
            continue
        local[start] = n
        todo = deque([start])
        while todo:
            a = todo.popleft()
            for b in np.nonzero(near[a] & (local < 0))[0]:
                local[b] = n
                todo.append(int(b))
        n += 1
    labels[flagged] = local
    return labels, n


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
    defects: list[Defect] = []
    for region in range(n):
        idx = np.nonzero(flat_labels == region)[0]
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
