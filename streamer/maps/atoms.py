"""Atomic columns in a frame: smoothed local maxima, optionally refined to sub-pixel centres.

Atom-centred patches (the paper's STEM case) need the same centres in training (``models.data``) and serving
(``streamer.maps.pipeline``), so the finder lives here, written once over numpy and torch (``streamer.maps.arrays``).
Two steps cannot be: the smoothing and the maximum filter. numpy with scipy.ndimage is the reference, and runs
whenever the frame is on the host (a numpy array or a CPU tensor, so training and CPU serving find the same
centres); torch's ``conv2d``/``max_pool2d`` run only on a frame on the GPU, where a test holds them to the reference
(the smoothing differs there in float32 rounding, so a peak within that of the threshold or of a tie can differ).

Steps: Gaussian smoothing (separable, reflect-padded, so noise does not make spurious maxima) → normalise the smoothed
frame to [0, 1] (so ``threshold`` is relative and survives gain changes) → a pixel is a peak when it equals the maximum
of its ``(2·min_distance+1)²`` window and exceeds ``threshold`` → ties on a plateau (an atom exactly between two
pixels) keep one pixel → optional centre of mass of the smoothed frame around each peak (a square of half width 0.3
of the column spacing, less its 20th percentile) → optionally one sublattice, or the centres of its unit cells.

**One sublattice** (``sublattice="brightest"``): atom-centred patches on a lattice with two kinds of column (the A and B
sites of a perovskite, Mo and S₂ in MoS₂) split into classes by sublattice, which is not what a user asks the classes
for. Each column's intensity is compared with the median of its 4 nearest columns; when that local contrast is clearly
bimodal (two-group split by Otsu's criterion, Ashman's D ≥ 2, each group ≥ 20 %) the lattice decides which columns are
kept, not each column's brightness: the bond graph colours the columns into two sublattices (``lattice_colours``) and,
where it does so consistently (≥ 97 % of bonds) and the bright columns sit on one colour (its share of bright columns ≥
0.5 above the other's, or ≥ 30 % against at most a quarter of that), that colour is kept, whole — a dark dopant or a dim
column on the bright sublattice stays (it is selected by where it is), and so does a region where the two sublattices
look alike. The PbTiO₃/SrRuO₃ film has such regions: judged column by column (the rule before), they kept both
sublattices there, and their "unit cells" came out at half the spacing. Where the bonds cannot colour the lattice (the
MoS₂ scan's find agrees with 87 % of them), the column-by-column rule stays: the brighter group's lattice spacing ``d``
is measured and every column whose nearest bright column (other than itself) is at least ``0.85·d`` away is kept. A
unimodal frame keeps every column.

**Unit-cell centres** (``sublattice="cells"``): the paper's polarisation case centres patches on unit cells, so the
column inside each cell (the B site of a perovskite) is the patch's centre and its displacement from the cell's
centre is what moves in the patch. The bright sublattice above is kept and refined, then each square of four of its
columns gives the midpoint of its diagonals (pairs 1.2–1.65 spacings apart); a cell is kept where both diagonals
meet, so stray pairs (an edge's partial peaks) and cells missing a corner give none. Measured on the PbTiO₃/SrRuO₃
scan (docs/real-data.md): on column-centred 32-px patches the B displacement lives in principal components 5–10,
behind the film's changing A/B contrast; on cell-centred patches the size of one column, min-max normalised, the
first three components hold it (the first two at 0.34 spacings). Only square-like lattices have such cells: a
hexagonal one gives none, and the data reader says so.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components
from scipy.spatial import cKDTree

from streamer.maps.arrays import (
    Array,
    arange,
    asarray_like,
    astype,
    dtype_name,
    is_floating,
    is_tensor,
    on_gpu,
    to_host,
    zeros,
)

__all__ = [
    "SUBLATTICES",
    "AtomFinderError",
    "Sublattice",
    "cell_centres",
    "find_atoms",
    "gaussian_smooth",
    "lattice_colours",
    "median_spacing",
    "one_sublattice",
]

Sublattice = Literal["all", "brightest", "cells"]
SUBLATTICES: tuple[str, ...] = ("all", "brightest", "cells")
_BIMODAL_D = 2.0
_LOCAL = 4
_MIN_SHARE = 0.2
#: sub-pixel refinement: window half width over the column spacing, and the window's quantile taken as its floor
_REFINE_SHARE = 0.3
_FLOOR_QUANTILE = 0.2
#: a cell's diagonal, in spacings (√2 on a square lattice), and how close two midpoints are to be one cell's
_DIAGONAL = (1.2, 1.65)
_SAME_CELL = 0.25
#: lattice bonds in nearest-neighbour distances: to the same sublattice (√2 centred square, √3 honeycomb), ± share
_SAME_BONDS = (math.sqrt(2), math.sqrt(3))
_BOND_TOLERANCE = 0.12
#: when one sublattice is the bright one: its share of (locally) bright columns exceeds the other's by this much ...
_COLOUR_EXPLAINS = 0.5
#: ... or at least this share of its columns are bright and the other's share is at most ``_COLOUR_DIM`` of that:
#: where a film's A and B look alike over much of a field of view (the right half of the PbTiO₃ scan, its lower film
#: wide there) the A share falls to ~0.5 while B's stays ~0.01, and the difference alone called that unclear
_COLOUR_BRIGHT = 0.3
_COLOUR_DIM = 0.25
#: the share of bonds a colouring must satisfy to be trusted: 0.99 on the PbTiO₃ scan, 0.87 on the MoS₂ one
_BONDS_AGREE = 0.97
_SAME_SUBLATTICE = 0.85


class AtomFinderError(ValueError):
    """A frame or a parameter the atom finder cannot work with."""


def gaussian_smooth(frame: Array, sigma: float) -> Array:
    """A 2-D frame blurred by a Gaussian of width ``sigma`` pixels (two 1-D passes, edges reflected), float."""
    if is_tensor(frame) and not on_gpu(frame):  # the host runs the numpy reference, whichever kind came in
        return sys.modules["torch"].from_numpy(_smooth(frame.detach().numpy(), sigma))
    return _smooth(frame, sigma)


def _smooth(frame: Array, sigma: float) -> Array:
    x = frame if is_floating(frame) else astype(frame, "float32")
    radius = min(max(1, math.ceil(3.0 * sigma)), x.shape[0] - 1, x.shape[1] - 1) if sigma > 0 else 0
    if radius < 1:
        return x.clone() if is_tensor(x) else x.copy()
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    if not is_tensor(x):  # scipy's "mirror" is torch's "reflect": the edge pixel is not repeated
        return ndimage.correlate1d(ndimage.correlate1d(x, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")
    F = sys.modules["torch"].nn.functional
    k = asarray_like(kernel.astype(dtype_name(x)), x)
    img = F.pad(x[None, None], (radius, radius, radius, radius), mode="reflect")
    img = F.conv2d(img, k.view(1, 1, -1, 1))
    return F.conv2d(img, k.view(1, 1, 1, -1))[0, 0]


def _max_filter(x: Array, window: int) -> Array:
    """The maximum over each pixel's ``window``² square (outside the frame counts as -inf)."""
    if not is_tensor(x):
        return ndimage.maximum_filter(x, size=window, mode="constant", cval=-np.inf)
    F = sys.modules["torch"].nn.functional
    return F.max_pool2d(x[None, None], window, stride=1, padding=window // 2)[0, 0]


def _where(condition: Array, a: Array | float, b: Array | float) -> Array:
    return sys.modules["torch"].where(condition, a, b) if is_tensor(condition) else np.where(condition, a, b)


def _normalise(x: Array) -> Array | None:
    lo, hi = x.min(), x.max()
    span = float(hi - lo)
    if not math.isfinite(span) or span <= 0:
        return None
    return (x - lo) / span


def _one_per_plateau(values: Array, peaks: Array, window: int) -> Array:
    """Among peaks that share a window (which means they are equal: each is the window's maximum) keep the last."""
    h, w = values.shape
    index = arange(0, h * w, like=values, dtype="float64").reshape(h, w)
    tagged = _where(peaks, index, -1.0)
    return peaks & (_max_filter(tagged, window) == tagged)


def _centre_of_mass(values: Array, peaks_yx: Array, radius: int) -> Array:
    """Each peak moved to the centre of mass of ``values`` in a square around it, less the window's 20th percentile.

    Why that floor: the window must reach the column's flanks (a window of a few pixels truncates the column and pulls
    the centre to its peak pixel), and then holds the tails of neighbouring columns too; subtracting the window's
    minimum left those tails in as a pull towards the brighter neighbours. A low percentile drops the tails and the
    background alike. Measured against 2-D Gaussian fits of the PbTiO₃/SrRuO₃ columns (docs/real-data.md): the
    earlier 5×5 window less its minimum was 0.28/0.31 px (std, y/x) off, this 0.09/0.10 px.
    """
    h, w = values.shape
    offsets = arange(-radius, radius + 1, like=values)
    dy = (offsets[:, None] + 0 * offsets[None, :]).reshape(1, -1)
    dx = (0 * offsets[:, None] + offsets[None, :]).reshape(1, -1)
    ys = peaks_yx[:, 0, None] + dy
    xs = peaks_yx[:, 1, None] + dx
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    vals = values[ys.clip(0, h - 1), xs.clip(0, w - 1)]
    ordered = sys.modules["torch"].sort(vals, dim=1).values if is_tensor(vals) else np.sort(vals, axis=1)
    floor = ordered[:, int(_FLOOR_QUANTILE * (vals.shape[1] - 1)), None]
    weights = _where(inside, (vals - floor).clip(0, None), 0.0)
    total = weights.sum(axis=1)
    safe = _where(total > 0, total, 1.0)
    dtype = dtype_name(values)
    cy = (weights * astype(ys, dtype)).sum(axis=1) / safe
    cx = (weights * astype(xs, dtype)).sum(axis=1) / safe
    refined = sys.modules["torch"].stack([cy, cx], dim=1) if is_tensor(cy) else np.stack([cy, cx], axis=1)
    return _where((total > 0)[:, None], refined, astype(peaks_yx, dtype))


def median_spacing(points: np.ndarray) -> float:
    """Median distance from each of ``points`` (N ≥ 2, 2) to its nearest other point: the column spacing."""
    return float(np.median(cKDTree(points).query(points, k=2)[0][:, 1]))


def _refine_radius(peaks_yx: np.ndarray, min_distance: int) -> int:
    """The centre-of-mass half width: 0.3 of the median nearest-neighbour distance of the peaks (every column, both
    sublattices), so the window holds the column's flanks and stops short of the next column; ``min_distance // 2``
    (at least 1) when there are too few peaks to measure a spacing."""
    if len(peaks_yx) < 3:
        return max(1, min_distance // 2)
    return max(1, round(_REFINE_SHARE * median_spacing(peaks_yx)))


def one_sublattice(centres: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the columns on the brighter sublattice (see the module docstring); all when not bimodal."""
    n = centres.shape[0]
    keep = np.ones(n, dtype=bool)
    if n < 8:
        return keep
    pts = np.asarray(centres, np.float64)
    v = np.asarray(values, np.float64)
    # each column against its nearest neighbours: the two sublattices differ locally, even where a bright layer
    # (the substrate) makes the whole frame's intensities bimodal for another reason
    tree = cKDTree(pts)
    dist, idx = tree.query(pts, k=min(_LOCAL + 1, n))
    r = v - np.median(v[idx[:, 1:]], axis=1)
    bright = _upper_mode(r)
    if bright is None:
        return keep
    colour, component, agreement = _colour_by_bonds(pts, tree, float(np.median(dist[:, 1])))
    if agreement < _BONDS_AGREE:  # not a two-sublattice lattice the bonds can colour (a triangular one, a messy find)
        return _near_bright(pts, bright)
    # per component, each colour's share of bright columns (one bincount: this runs on every frame the service cuts)
    key = 2 * component + colour
    counts = np.bincount(key, minlength=2 * n).reshape(-1, 2)
    share = np.bincount(key, bright.astype(np.float64), 2 * n).reshape(-1, 2) / np.maximum(counts, 1)
    high, low = share.max(axis=1), share.min(axis=1)  # the geometry's sublattices are the brightnesses, when:
    clear = (high - low >= _COLOUR_EXPLAINS) | ((high >= _COLOUR_BRIGHT) & (low <= _COLOUR_DIM * high))
    by_colour = colour == (share[:, 1] > share[:, 0])[component]
    return by_colour if clear[component].all() else np.where(clear[component], by_colour, _near_bright(pts, bright))


def _near_bright(pts: np.ndarray, bright: np.ndarray) -> np.ndarray:
    """The column-by-column rule: bright columns and whatever sits on their lattice, judged from the nearest bright
    column (module docstring) — where the lattice's bonds cannot say which sublattice a column is on."""
    tree = cKDTree(pts[bright])
    d_bright = float(np.median(tree.query(pts[bright], k=2)[0][:, 1]))
    dist, _ = tree.query(pts, k=2)
    return np.where(bright, dist[:, 1], dist[:, 0]) >= _SAME_SUBLATTICE * d_bright


def lattice_colours(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(colour, component, agreement)``: which of the two sublattices each of ``points`` sits on (``(N,)`` 0 or 1, up
    to a swap within each ``component`` of the bond graph), from geometry alone, and the share of bonds it satisfies.

    Bonds at the nearest-neighbour distance join the two sublattices, bonds at √2 (a centred square lattice: the
    perovskite's A and B sites) or √3 of it (a honeycomb: MoS₂'s Mo and S₂) join one to itself; a spanning tree of
    that graph colours it, and two rounds of each column taking the colour most of its bonds imply undo what a
    false column (an odd cycle) did to its part of the tree. A lattice the bonds cannot 2-colour (a triangular one,
    a find with many false or missing columns) shows as a low ``agreement``."""
    tree = cKDTree(points)
    return _colour_by_bonds(points, tree, float(np.median(tree.query(points, k=2)[0][:, 1])))


def _colour_by_bonds(points: np.ndarray, tree: cKDTree, nearest: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``lattice_colours`` on a tree of ``points`` and their median nearest-neighbour distance, which
    ``one_sublattice`` has already (on a frame of 10⁴ columns that query is a third of the colouring's cost)."""
    n = len(points)
    if not nearest > 0:  # most columns found twice: no lattice to read
        return np.zeros(n, np.int64), np.arange(n), 0.0
    pairs = tree.query_pairs((1 + _BOND_TOLERANCE) * _SAME_BONDS[-1] * nearest, output_type="ndarray").reshape(-1, 2)
    r = np.hypot(*(points[pairs[:, 0]] - points[pairs[:, 1]]).T) / nearest
    other = np.abs(r - 1.0) < _BOND_TOLERANCE
    same = np.any([np.abs(r - b) < _BOND_TOLERANCE * b for b in _SAME_BONDS], axis=0)
    bonds, flip = pairs[other | same], other[other | same].astype(np.int64)
    i, j = np.concatenate([bonds[:, 0], bonds[:, 1]]), np.concatenate([bonds[:, 1], bonds[:, 0]])
    f = np.concatenate([flip, flip])
    graph = coo_matrix((f + 1, (i, j)), shape=(n, n)).tocsr()  # 1: same sublattice, 2: the other
    count, component = connected_components(graph, directed=False)
    # one BFS over the whole forest: a virtual node n joined to each component's first column is the root of all
    # (a BFS per component costs components × columns on a find broken into many pieces)
    roots = np.unique(component, return_index=True)[1]
    forest = coo_matrix(
        (np.r_[f + 1, np.ones(count)], (np.r_[i, np.full(count, n)], np.r_[j, roots])), shape=(n + 1, n + 1)
    )
    parent = breadth_first_order(forest.tocsr(), n, directed=False, return_predecessors=True)[1][:n]
    parent[roots] = roots
    # each column's colour is the parity of the flips on its path to the root: pointer jumping, log(depth) steps
    colour = np.asarray(graph[parent, np.arange(n)]).ravel().astype(np.int64) - 1
    colour[parent == np.arange(n)] = 0
    up = parent.copy()
    while np.any(up != up[up]):
        colour, up = colour ^ colour[up], up[up]
    for _ in range(2):
        implied = colour[j] ^ f
        ones, total = np.bincount(i, implied, n), np.bincount(i, minlength=n)
        colour = np.where(2 * ones > total, 1, np.where(2 * ones < total, 0, colour))
    agreement = float(np.mean((colour[i] ^ colour[j]) == f)) if len(f) else 0.0
    return colour, component, agreement


def cell_centres(points: np.ndarray, spacing: float) -> np.ndarray:
    """``(M, 2)`` float64: the centres of the cells of the square-like lattice ``points`` (N, 2) with nearest-neighbour
    distance ``spacing`` — the midpoints of its cells' diagonals, a cell's two merged (module docstring)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) < 4:
        return np.zeros((0, 2))
    pairs = cKDTree(pts).query_pairs(_DIAGONAL[1] * spacing, output_type="ndarray").reshape(-1, 2)
    diagonal = pairs[np.hypot(*(pts[pairs[:, 0]] - pts[pairs[:, 1]]).T) > _DIAGONAL[0] * spacing]
    mid = 0.5 * (pts[diagonal[:, 0]] + pts[diagonal[:, 1]])
    if len(mid) == 0:
        return np.zeros((0, 2))
    close = cKDTree(mid).query_pairs(_SAME_CELL * spacing, output_type="ndarray")
    label = _components(len(mid), close)
    count = np.bincount(label)
    centres = np.stack([np.bincount(label, mid[:, k]) / count for k in range(2)], axis=1)
    # a cell is whole when both its diagonals meet there; a lone midpoint is a pair of stray columns (an edge's
    # partial peaks, a defect) or a cell missing a corner, and its centre is not the cell's
    whole = centres[count >= 2]
    # row-major by whole pixel, as the peaks come (a row's jitter must not decide the order)
    return whole[np.lexsort((whole[:, 1], np.round(whole[:, 0])))]


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component labels ``(n,)`` of the graph with edges ``pairs`` (E, 2)."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _upper_mode(r: np.ndarray) -> np.ndarray | None:
    """The upper group of a clearly two-group 1-D sample (Otsu split, Ashman's D >= 2, each >= 20 %), else None."""
    n = r.size
    v = np.sort(r)
    k = np.arange(1, n)
    left = np.cumsum(v)[:-1]
    mean_lo, mean_hi = left / k, (v.sum() - left) / (n - k)
    best = int(np.argmax(k * (n - k) * (mean_hi - mean_lo) ** 2))
    lo, hi = v[: best + 1], v[best + 1 :]
    if min(lo.size, hi.size) < _MIN_SHARE * n:
        return None
    spread = math.sqrt((lo.var() + hi.var()) / 2)
    if spread <= 0 or (hi.mean() - lo.mean()) / spread < _BIMODAL_D:
        return None
    return r > v[best]


def find_atoms(
    frame: Array,
    *,
    sigma: float,
    min_distance: int,
    threshold: float,
    subpixel: bool = True,
    sublattice: Sublattice = "all",
) -> Array:
    """Centres of bright columns in a 2-D ``frame``: ``(N, 2)`` float32 ``(y, x)`` in frame pixels, row-major order.

    ``min_distance`` is the smallest separation of two peaks in pixels (the maximum-filter half width); ``threshold``
    is relative to the smoothed frame's range (0 keeps every local maximum, 1 only the brightest). ``subpixel``
    refines each peak to the centre of mass in a square of half width 0.3 of the columns' spacing
    (``_centre_of_mass``). ``sublattice`` "brightest" keeps one sublattice, "cells" returns the centres of its unit
    cells instead (module docstring). The frame's kind of array on its device comes back.
    """
    if frame.ndim != 2:
        raise AtomFinderError(f"frame must be 2-D (H, W), got shape {tuple(frame.shape)}")
    if min_distance < 1:
        raise AtomFinderError(f"min_distance={min_distance} must be at least 1 pixel")
    if not 0.0 <= threshold <= 1.0:
        raise AtomFinderError(f"threshold={threshold} is relative to the frame's range; use a value in [0, 1]")
    if sigma < 0:
        raise AtomFinderError(f"sigma={sigma} must be non-negative (0 turns smoothing off)")
    if sublattice not in SUBLATTICES:
        raise AtomFinderError(f"sublattice={sublattice!r} must be one of {list(SUBLATTICES)}")
    if is_tensor(frame) and not on_gpu(frame):  # the host runs the numpy reference, whichever kind came in
        host = _find(frame.detach().numpy(), sigma, min_distance, threshold, subpixel, sublattice)
        return sys.modules["torch"].from_numpy(host)
    return _find(frame, sigma, min_distance, threshold, subpixel, sublattice)


def _find(
    frame: Array, sigma: float, min_distance: int, threshold: float, subpixel: bool, sublattice: Sublattice
) -> Array:
    """``find_atoms`` on the frame's kind of array: numpy (the reference) or a tensor (the GPU path)."""
    empty = zeros((0, 2), "float32", like=frame)
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        return empty
    smooth = _normalise(_smooth(frame, sigma))
    if smooth is None:
        return empty
    window = 2 * min_distance + 1
    peaks = (smooth >= _max_filter(smooth, window)) & (smooth > threshold)
    peaks = _one_per_plateau(smooth, peaks, window)
    yx = peaks.nonzero() if is_tensor(peaks) else np.argwhere(peaks)
    if yx.shape[0] == 0:
        return empty
    # every peak on the host, once, only for what reads it: the spacing (before one sublattice is kept) and the split
    one = sublattice in ("brightest", "cells")
    every = to_host(yx).astype(np.float64) if subpixel or one else None
    radius = _refine_radius(every, min_distance) if every is not None and subpixel else 0
    if one and every is not None:
        values = to_host(smooth[yx[:, 0], yx[:, 1]]).astype(np.float64)
        keep = one_sublattice(every, values)
        yx = yx[asarray_like(keep, yx)]
    found = astype(_centre_of_mass(smooth, yx, radius) if subpixel else yx, "float32")
    if sublattice != "cells":
        return found
    columns = to_host(found).astype(np.float64)
    spacing = median_spacing(columns) if len(columns) >= 2 else 0.0
    cells = cell_centres(columns, spacing) if spacing > 0 else np.zeros((0, 2))
    return asarray_like(cells.astype(np.float32), frame)
