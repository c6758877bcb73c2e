"""Grid regions labelled run by run agree with a cell-by-cell search, and defects per region come out right.

The run-based labelling replaced a breadth-first search over cells (it cost more than the encoder when an unsure
model flagged the whole grid); the search is kept here as the reference.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from streamer.defects import LINK_FACTOR, grid_centres, grid_regions, point_regions, regions_to_defects


def _reference(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Breadth-first search from each unlabelled flagged cell in row-major order."""
    gh, gw = mask.shape
    labels = np.full((gh, gw), -1, dtype=np.int64)
    steps = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a or b) and (connectivity == 8 or not (a and b))]
    n = 0
    for i0, j0 in zip(*np.nonzero(mask), strict=True):
        if labels[i0, j0] >= 0:
            continue
        labels[i0, j0] = n
        todo = deque([(i0, j0)])
        while todo:
            i, j = todo.popleft()
            for di, dj in steps:
                a, b = i + di, j + dj
                if 0 <= a < gh and 0 <= b < gw and mask[a, b] and labels[a, b] < 0:
                    labels[a, b] = n
                    todo.append((a, b))
        n += 1
    return labels, n


def _snake(h: int, w: int) -> np.ndarray:
    """One region winding through the whole grid: the longest chain of runs a grid can hold."""
    m = np.zeros((h, w), bool)
    m[::2] = True
    m[1::4, -1] = True
    m[3::4, 0] = True
    return m


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [np.zeros((4, 5), bool), np.ones((7, 3), bool), np.eye(9, dtype=bool), np.eye(9, dtype=bool)[::-1]]
    masks += [_snake(21, 13), _snake(21, 13).T, np.ones((1, 1), bool), np.zeros((1, 9), bool)]
    for density in (0.05, 0.3, 0.5, 0.7, 0.95):
        for shape in ((1, 17), (17, 1), (6, 9), (31, 24)):
            masks.append(rng.random(shape) < density)
    return masks


@pytest.mark.parametrize("connectivity", [4, 8])
def test_run_labelling_equals_the_cell_by_cell_search(connectivity: int) -> None:
    for mask in _masks():
        labels, n = grid_regions(mask, connectivity)  # type: ignore[arg-type]
        want, n_want = _reference(mask, connectivity)
        assert n == n_want and np.array_equal(labels, want), (mask.astype(int), connectivity)


def test_diagonal_neighbours_join_with_8_connectivity_only() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], bool)
    assert grid_regions(mask, 8)[1] == 2
    labels, n = grid_regions(mask, 4)
    assert n == 3 and labels.tolist() == [[0, -1, -1], [-1, 1, -1], [-1, -1, -1], [2, 2, -1]]


def test_many_small_regions_each_get_their_own_defect() -> None:
    """A 4-connected checkerboard is one region per flagged cell: each defect is its cell exactly."""
    gh, gw = 9, 11
    mask = (np.add.outer(np.arange(gh), np.arange(gw)) % 2) == 0
    labels, n = grid_regions(mask, 4)
    assert n == int(mask.sum())
    centres = grid_centres((gh, gw), (16, 16), (8, 8), (0, 0))
    cls = np.arange(gh * gw).reshape(gh, gw) % 3
    score = np.linspace(0.5, 1.0, gh * gw, dtype=np.float32).reshape(gh, gw)
    defects = regions_to_defects(labels, n, centres, cls, score)
    cells = list(zip(*np.nonzero(mask), strict=True))  # row-major: the regions' order
    assert len(defects) == len(cells)
    for d, (i, j) in zip(defects, cells, strict=True):
        assert (d.y, d.x) == pytest.approx((float(centres[i, j, 0]), float(centres[i, j, 1])))
        assert d.area == 1 and d.class_ == cls[i, j] and d.score == pytest.approx(float(score[i, j]))


def test_a_region_reports_its_weighted_centroid_majority_class_and_largest_score() -> None:
    mask = np.array([[1, 1, 0], [0, 1, 0]], bool)
    labels, n = grid_regions(mask, 8)
    centres = grid_centres((2, 3), (4, 4), (2, 2), (0, 0))
    cls = np.array([[2, 1, 0], [0, 1, 0]])
    score = np.array([[0.25, 0.5, 0.0], [0.0, 0.25, 0.0]], np.float32)
    (d,) = regions_to_defects(labels, n, centres, cls, score)
    cells = [(0, 0), (0, 1), (1, 1)]
    w = np.array([score[c] for c in cells], np.float64)
    want = (w[:, None] * np.array([centres[c] for c in cells], np.float64)).sum(0) / w.sum()
    assert (d.y, d.x) == pytest.approx(tuple(want)) and d.class_ == 1 and d.area == 3 and d.score == 0.5


def _reference_points(mask: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, int]:
    """The full distance matrix and a search from each unlabelled flagged atom in index order."""
    pts = pts.astype(np.float64)
    labels = np.full(len(pts), -1, dtype=np.int64)
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    link = LINK_FACTOR * float(np.median(d.min(axis=1))) if len(pts) >= 2 else 0.0
    n = 0
    for start in np.nonzero(mask)[0]:
        if labels[start] >= 0:
            continue
        labels[start] = n
        todo = deque([start])
        while todo:
            a = todo.popleft()
            for b in np.nonzero(mask & (d[a] <= link) & (labels < 0))[0]:
                labels[b] = n
                todo.append(b)
        n += 1
    return labels, n


def _point_sets() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    k = np.stack(np.meshgrid(np.arange(14), np.arange(11), indexing="ij"), -1).reshape(-1, 2)
    return [
        np.zeros((1, 2)),
        np.array([[0.0, 0.0], [0.0, 3.0]]),
        rng.random((150, 2)) * 100,
        k * 9.7 + rng.normal(0, 0.8, k.shape),  # a jittered lattice, as atoms are
        np.round(rng.random((80, 2)) * 12),  # coincident centres
        np.stack([np.arange(60) * 3.0, np.zeros(60)], axis=1),  # all on one line
        np.concatenate([rng.random((40, 2)) * 5, rng.random((30, 2)) * 400 + 1000]),  # two far clusters
    ]


def test_point_regions_match_a_full_distance_matrix_search() -> None:
    rng = np.random.default_rng(6)
    for pts in _point_sets():
        for density in (0.0, 0.2, 0.6, 1.0):
            mask = rng.random(len(pts)) < density
            labels, n = point_regions(mask, pts.astype(np.float32))
            want, n_want = _reference_points(mask, pts.astype(np.float32))
            assert n == n_want and np.array_equal(labels, want), (len(pts), density)
