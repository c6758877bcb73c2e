"""Defects as connected regions of flagged patches, each published with its score, area, class and the score's kind.

**Score** (``defect_score``, float32 in [0, 1], one per patch), computed by ``streamer.maps.pipeline``:

* ``class`` — with defect classes configured, the probability mass the encoder puts on them (``class_score``);
* otherwise the calibrated novelty score of ``streamer.maps.novelty`` (``joint``, ``contrast``, ``density`` or
  ``combined``), which does not depend on how the classes came out; 0.5 is the threshold calibrated on the training
  patches.

**Flagged** patches are those whose argmax class is a defect class, or whose score is at least the threshold.

**Regions** group flagged patches that touch (``scipy.ndimage.label`` on the grid — 8-connectivity by default so a
defect line at 45° stays one region; atom-centred patches join when their centres are at most ``LINK_FACTOR`` × the
median nearest-neighbour distance apart, ``cKDTree`` pairs and ``csgraph.connected_components`` — the lattice analogue
of 8-connectivity). A region covering more than ``max_share`` of the frame's patches is **not** published: a defect
is local, and a frame that lights up as a whole means the model or its calibration does not fit the data, which the
``defects`` message says in its ``note`` rather than sending a controller to the frame's centre.

**Peaks**: a connected region is published as one defect per *peak* of its score (``grid_peaks``, ``point_peaks``),
because two defects a few patches apart often touch through a bridge of flagged patches, and one point at their
mean sits on neither (the controller would scan between them). The flagged patches are visited in descending score
(ties: the lower index first); a patch with no higher flagged neighbour starts a peak, any other joins the peak of
its highest neighbour (steepest ascent — a watershed on −score inside the mask). Where two peaks meet, at a saddle
``s``, the lower peak ``p`` stays its own defect only if it is over the threshold and the score really dips between
them, else it and its patches go to the higher peak (the elder rule of persistence-based clustering, Chazal et al.
2013, "ToMATo"). How deep the dip must be depends on whether one point could light both peaks:

* their patch windows overlap (an overlapping grid, or atom-centred patches wider than the atom spacing): one defect
  lights several neighbouring patches, and noise makes bumps on that blob, so ``p − s > PEAK_DEPTH · (p −
  threshold)`` — the dip measured against the peak's height over the threshold, the same rule for a faint defect as
  for a strong one;
* their windows do not overlap (on a grid cut at the patch size, peaks are always two or more patches apart): no
  point lies in both, so any dip, ``p > s``, makes them two defects. On the demo lattice (16-px patches at a 16-px
  stride) the score between two neighbouring defects dipped by as little as 0.14 of the lower one's height: a
  depth rule alone would have merged them.

A region flagged by its class alone (its score under the threshold) stays whole. ``max_share`` still looks at the
whole connected region: a frame that lights up as a whole is withheld however many peaks it has. A defect whose
signature spreads beyond one patch (STM interference ripples) can light peaks whose windows do not overlap and is
then published as several points.

Each published defect: centroid ``(y, x)`` in frame pixels, area in patches, majority class (ties go to the lower
index), the largest score, and the score's kind — all over the patches of its peak. The centroid is the mean of the
patch centres (a grid patch's centre is its geometric centre ``(y0 + i·sy + (ph-1)/2, x0 + j·sx + (pw-1)/2)``)
weighted by how far each patch's score exceeds the threshold — the centre of what stands out, where the score
itself as the weight let a peak's many patches just over the bar pull the point away: on the STM graphene scan
(overlapping 48-px patches, a defect's ripples lighting patches 50–100 px out) the marks' published points drifted
past the 48-px match radius (recall 0.67 → 0.78 at one training, offline, no other training changed; on the demo
lattice, whose patches do not overlap, a point moves by a few pixels). A peak none of whose patches exceeds the
threshold (flagged by its class alone) is weighted by the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from streamer.wire.protocol import Defect

__all__ = [
    "ALWAYS_PUBLISHED_AREA",
    "DEFAULT_MAX_SHARE",
    "LINK_FACTOR",
    "PEAK_DEPTH",
    "Connectivity",
    "DefectRule",
    "Peaks",
    "Regions",
    "class_score",
    "defect_mask",
    "grid_centres",
    "grid_peaks",
    "grid_regions",
    "point_peaks",
    "point_regions",
    "publishable",
    "regions_to_defects",
]

Connectivity = Literal[4, 8]
LINK_FACTOR = 1.5
DEFAULT_MAX_SHARE = 0.05
ALWAYS_PUBLISHED_AREA = 4
#: a lower peak whose patch window overlaps the higher one's is its own defect when the score dips between them by
#: more than this share of its height over the threshold (``streamer.maps.defects``' docstring says why)
PEAK_DEPTH = 0.5


@dataclass(frozen=True)
class DefectRule:
    """Which patches are defects: class indices, a score threshold, how flagged grid cells connect, and the largest
    share of a frame's patches one published region may cover."""

    classes: tuple[int, ...] = ()
    threshold: float = 0.5
    connectivity: Connectivity = 8
    max_share: float = DEFAULT_MAX_SHARE


@dataclass(frozen=True)
class Regions:
    """Labels of flagged patches (``-1`` off the mask, else ``0..n-1``) and the region count."""

    labels: np.ndarray
    n: int


@dataclass(frozen=True)
class Peaks:
    """Connected regions split at their score peaks: ``labels`` (``-1`` off the mask, else ``0..n-1``, numbered by
    each peak's first patch in index order) and ``region`` ``(n,)``, the connected region each peak lies in."""

    labels: np.ndarray
    n: int
    region: np.ndarray


def class_score(class_prob: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``(..., K)`` class probabilities → ``(...)`` probability mass on the defect ``classes``."""
    p = np.asarray(class_prob, dtype=np.float32)
    if not classes:
        return np.zeros(p.shape[:-1], dtype=np.float32)
    return np.clip(p[..., list(classes)].sum(axis=-1), 0.0, 1.0).astype(np.float32)


def defect_mask(cls: np.ndarray, score: np.ndarray, rule: DefectRule) -> np.ndarray:
    """Flagged patches: argmax class among the defect classes, or score at least the threshold."""
    mask = score >= rule.threshold
    if rule.classes:
        mask |= np.isin(cls, np.asarray(rule.classes))
    return mask


def grid_regions(mask: np.ndarray, connectivity: Connectivity = 8) -> Regions:
    """Connected regions of a 2-D boolean grid, numbered in row-major order of their first cell."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity!r} must be 4 or 8")
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)
    return Regions(labels=labels.astype(np.int64) - 1, n=int(n))


def point_regions(mask: np.ndarray, centres: np.ndarray, *, link_factor: float = LINK_FACTOR) -> Regions:
    """Regions of flagged atoms; two join within ``link_factor`` × the frame's median nearest-neighbour distance.

    Numbered in the order of their first flagged atom.
    """
    flagged, pairs = _point_pairs(mask, centres, link_factor)
    labels = np.full(np.asarray(mask).size, -1, dtype=np.int64)
    if flagged.size == 0:
        return Regions(labels=labels, n=0)
    m = flagged.size
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)  # renumber: by each component's first flagged atom
    order = np.empty(first.size, np.int64)
    order[np.argsort(first)] = np.arange(first.size)
    labels[flagged] = order[comp]
    return Regions(labels=labels, n=int(first.size))


def _point_pairs(mask: np.ndarray, centres: np.ndarray, link_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """``(flagged atoms' indices (m,), linked pairs (p, 2) as positions in flagged)``."""
    pts = np.asarray(centres, np.float64).reshape(-1, 2)
    flagged = np.nonzero(np.asarray(mask, dtype=bool).reshape(-1))[0]
    pairs = np.zeros((0, 2), np.int64)
    if pts.shape[0] >= 2 and flagged.size >= 2:
        nearest, _ = cKDTree(pts).query(pts, k=2)
        link = link_factor * float(np.median(nearest[:, 1]))
        pairs = cKDTree(pts[flagged]).query_pairs(link, output_type="ndarray").astype(np.int64)
    return flagged, pairs


def grid_peaks(
    regions: Regions,
    score: np.ndarray,
    centres: np.ndarray,
    *,
    patch: tuple[int, int],
    threshold: float,
    connectivity: Connectivity = 8,
    depth: float = PEAK_DEPTH,
    split: np.ndarray | None = None,
) -> Peaks:
    """``regions`` of ``grid_regions`` (same ``connectivity``) split at the peaks of ``score`` (same 2-D shape);
    ``centres`` ``(gh, gw, 2)`` of ``grid_centres`` and ``patch`` say whose windows overlap.

    ``split`` ``(regions.n,)`` bool: only those regions are split (the others — withheld ones — stay whole, unvisited).
    """
    labels = np.asarray(regions.labels)
    if labels.ndim != 2 or np.shape(score) != labels.shape:
        raise ValueError(f"score of shape {np.shape(score)} must be the grid's {labels.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity!r} must be 4 or 8")
    gh, gw = labels.shape
    index = np.arange(gh * gw).reshape(gh, gw)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    pairs = []
    for dy, dx in offsets:  # each neighbour pair once: right, down, and for 8-connectivity the two diagonals down
        x0, x1 = max(0, -dx), gw - max(0, dx)  # the columns whose neighbour at dx is on the grid
        a, b = index[: gh - dy, x0:x1], index[dy:, x0 + dx : x1 + dx]
        pairs.append(np.stack([a.reshape(-1), b.reshape(-1)], axis=1))
    flat = labels.reshape(-1)
    flagged = np.nonzero(flat >= 0)[0]
    position = np.full(flat.size, -1, np.int64)
    position[flagged] = np.arange(flagged.size)
    cell_pairs = position[np.concatenate(pairs)]
    cell_pairs = cell_pairs[(cell_pairs >= 0).all(axis=1)]
    flood = _Flood(np.asarray(score).reshape(-1), np.asarray(centres).reshape(-1, 2), patch, threshold, depth)
    return _split_at_peaks(regions, flagged, cell_pairs, flood, split)


def point_peaks(
    regions: Regions,
    score: np.ndarray,
    centres: np.ndarray,
    *,
    patch: tuple[int, int],
    threshold: float,
    link_factor: float = LINK_FACTOR,
    depth: float = PEAK_DEPTH,
    split: np.ndarray | None = None,
) -> Peaks:
    """``regions`` of ``point_regions`` (same ``link_factor``) split at the peaks of ``score`` ``(n,)`` over the
    linked atoms; ``patch``: the atom-centred patch, whose windows around two atoms may overlap. ``split``: as for
    ``grid_peaks``."""
    flagged, pairs = _point_pairs(np.asarray(regions.labels) >= 0, centres, link_factor)
    flood = _Flood(np.asarray(score).reshape(-1), np.asarray(centres).reshape(-1, 2), patch, threshold, depth)
    return _split_at_peaks(regions, flagged, pairs, flood, split)


@dataclass(frozen=True)
class _Flood:
    """What the flood compares, per patch of the frame: its score and centre; and the patch size, threshold, depth."""

    score: np.ndarray
    centres: np.ndarray
    patch: tuple[int, int]
    threshold: float
    depth: float


def _split_at_peaks(
    regions: Regions, flagged: np.ndarray, pairs: np.ndarray, flood: _Flood, split: np.ndarray | None
) -> Peaks:
    """The flood of the module docstring over the flagged patches (``flagged``: their flat indices; ``pairs``:
    neighbouring ones, as positions in ``flagged``), a union-find whose roots are the peaks."""
    flat = np.asarray(regions.labels).reshape(-1)
    m = flagged.size
    root = np.arange(m)  # union-find over the flagged patches; a root is its peak's first (highest) patch
    if split is not None:  # regions left whole: every patch joins the region's first patch, no flood
        whole = ~np.asarray(split, bool)[flat[flagged]]
        _, region_first = np.unique(flat[flagged], return_index=True)  # every region has a patch: index by label
        root[whole] = region_first[flat[flagged][whole]]
        pairs = pairs[~whole[pairs[:, 0]]]  # both ends of a pair lie in one region
    s = flood.score[flagged].astype(np.float64)
    pos = flood.centres[flagged].astype(np.float64)
    window = np.asarray(flood.patch, np.float64)
    if pairs.size:
        graph = coo_matrix((np.ones(2 * len(pairs)), (pairs.reshape(-1), pairs[:, ::-1].reshape(-1))), shape=(m, m))
        graph = graph.tocsr()
        indptr, neighbours = graph.indptr, graph.indices
        order = np.lexsort((np.arange(m), -s))  # descending score, ties: the lower index first
        rank = np.empty(m, np.int64)
        rank[order] = np.arange(m)

        def find(i: int) -> int:
            while root[i] != i:
                root[i] = root[root[i]]
                i = int(root[i])
            return i

        for i in order[np.diff(indptr)[order] > 0].tolist():
            higher = [j for j in neighbours[indptr[i] : indptr[i + 1]].tolist() if rank[j] < rank[i]]
            if not higher:
                continue  # a peak
            root[i] = find(min(higher, key=rank.__getitem__))  # steepest ascent: the highest neighbour's peak
            for j in higher:  # i is the saddle between its peak and each other peak it touches
                a, b = find(i), find(j)
                if a == b:
                    continue
                elder, younger = (a, b) if rank[a] < rank[b] else (b, a)
                height = s[younger] - flood.threshold
                one_point = bool((np.abs(pos[younger] - pos[elder]) < window).all())  # windows overlap
                if height <= 0 or s[younger] - s[i] <= (flood.depth * height if one_point else 0.0):
                    root[younger] = elder
        for i in range(m):
            root[i] = find(i)
    peak_ids, first, per_patch = np.unique(root, return_index=True, return_inverse=True)
    order_of = np.empty(peak_ids.size, np.int64)  # renumber: by each peak's first patch in index order
    order_of[np.argsort(first)] = np.arange(peak_ids.size)
    labels = np.full(flat.size, -1, np.int64)
    labels[flagged] = order_of[per_patch.reshape(-1)]
    region = np.empty(peak_ids.size, np.int64)
    region[order_of] = flat[flagged[peak_ids]]
    return Peaks(labels=labels.reshape(np.shape(regions.labels)), n=int(peak_ids.size), region=region)


def grid_centres(
    grid: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int], origin: tuple[int, int]
) -> np.ndarray:
    """``(gh, gw, 2)`` float32: the geometric centre (y, x) in frame pixels of every grid patch."""
    gh, gw = grid
    ys = origin[0] + np.arange(gh) * stride[0] + (patch[0] - 1) / 2.0
    xs = origin[1] + np.arange(gw) * stride[1] + (patch[1] - 1) / 2.0
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy, xx], axis=-1).astype(np.float32)


def publishable(regions: Regions, max_share: float) -> tuple[np.ndarray, str | None]:
    """``(keep (n,) bool, note)``: regions over ``max_share`` of the frame's patches are withheld — never one of at
    most ``ALWAYS_PUBLISHED_AREA`` patches (a point defect on a patch corner lights a 2×2 block, which on a small frame
    is over the share) — and the note says how many and why (``None``: all kept)."""
    total = regions.labels.size
    areas = np.bincount(regions.labels[regions.labels >= 0].reshape(-1), minlength=regions.n)
    keep = (areas <= max_share * total) | (areas <= ALWAYS_PUBLISHED_AREA)
    if keep.all():
        return keep, None
    big = areas[~keep]
    return keep, (
        f"{big.size} region(s) of {', '.join(str(int(a)) for a in big)} patches withheld: over max_share "
        f"{max_share:g} of the frame's {total} patches; the score is not calibrated for this data (re-export from "
        "training data like it) or the defect classes cover the frame"
    )


def regions_to_defects(
    regions: Regions | Peaks,
    centres: np.ndarray,
    cls: np.ndarray,
    score: np.ndarray,
    *,
    kind: str,
    keep: np.ndarray | None = None,
    threshold: float | None = None,
) -> list[Defect]:
    """One ``Defect`` per region or peak (those ``keep`` marks, when given); ``centres`` is ``labels.shape + (2,)``;
    the centroid weighs each patch by its score over ``threshold`` (module docstring; ``None``: by its score)."""
    flat = regions.labels.reshape(-1)
    pts = centres.reshape(-1, 2).astype(np.float64)
    w = score.reshape(-1).astype(np.float64)
    flat_cls = cls.reshape(-1).astype(np.int64)
    # the cells of each region as one slice of a stable sort, not a scan of the frame per region
    cells = np.nonzero(flat >= 0)[0]
    cells = cells[np.argsort(flat[cells], kind="stable")]
    bounds = np.searchsorted(flat[cells], np.arange(regions.n + 1))
    defects: list[Defect] = []
    for region in range(regions.n):
        if keep is not None and not keep[region]:
            continue
        idx = cells[bounds[region] : bounds[region + 1]]
        weights = w[idx]
        over = np.clip(weights - threshold, 0.0, None) if threshold is not None else weights
        pull = over if over.sum() > 0 else weights
        centroid = (pull[:, None] * pts[idx]).sum(0) / pull.sum() if pull.sum() > 0 else pts[idx].mean(0)
        defects.append(
            Defect(
                y=float(centroid[0]),
                x=float(centroid[1]),
                class_=int(np.bincount(flat_cls[idx]).argmax()),
                score=float(weights.max()),
                area=int(idx.size),
                kind=kind,
            )
        )
    return defects
