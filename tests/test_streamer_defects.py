"""Defect scores and regions: hand-made maps where the answer is known by construction, and a real exported encoder
calibrated on a defect-free synthetic scan (a clean frame publishes nothing, a foreign one never becomes a region)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
from artifact_factory import make_artifact

from sim.lattice import LatticeConfig, synth_scan
from streamer.maps.defects import (
    LINK_FACTOR,
    PEAK_DEPTH,
    DefectRule,
    Regions,
    class_score,
    defect_mask,
    grid_centres,
    grid_peaks,
    grid_regions,
    point_peaks,
    point_regions,
    publishable,
    regions_to_defects,
)
from streamer.maps.encoder import load
from streamer.maps.novelty import (
    contrast,
    fit_novelty,
    grid_neighbours,
    novelty_score,
    point_neighbours,
)
from streamer.maps.pipeline import Pipeline

PATCH, STRIDE, ORIGIN = (16, 16), (8, 8), (4, 2)


def _centre(i: int, j: int) -> tuple[float, float]:
    return ORIGIN[0] + i * STRIDE[0] + 7.5, ORIGIN[1] + j * STRIDE[1] + 7.5


def _defects(
    mask: np.ndarray, cls: np.ndarray, score: np.ndarray, connectivity: int = 8, threshold: float | None = 0.5
) -> list:
    regions = grid_regions(mask, connectivity)  # type: ignore[arg-type]
    centres = grid_centres(mask.shape, PATCH, STRIDE, ORIGIN)
    return regions_to_defects(regions, centres, cls, score, kind="class", threshold=threshold)


# ------------------------------------------------------------------ regions


def test_two_blobs_of_a_defect_class_give_two_regions_with_their_centroids_and_areas() -> None:
    cls = np.zeros((10, 12), np.uint8)
    cls[1:3, 1:4] = 2  # 6 patches
    cls[6:9, 8:10] = 2  # 6 patches
    cls[5, 0] = 1  # another class, not a defect
    score = np.full(cls.shape, 0.1, np.float32)  # below the threshold: only the class flags
    rule = DefectRule(classes=(2,), threshold=0.5, connectivity=8)
    defects = _defects(defect_mask(cls, score, rule), cls, score)
    a, b = sorted(defects, key=lambda d: d.y)
    assert (a.area, b.area) == (6, 6)
    assert (a.y, a.x) == pytest.approx((_centre(1, 1)[0] + 4.0, _centre(1, 2)[1]))  # rows 1-2, columns 1-3
    assert (b.y, b.x) == pytest.approx((_centre(7, 8)[0], _centre(7, 8)[1] + 4.0))  # rows 6-8, columns 8-9
    assert a.class_ == b.class_ == 2 and a.kind == "class"
    assert a.score == pytest.approx(0.1)


def test_centroid_weighs_what_exceeds_the_threshold_and_the_region_reports_max_score_and_majority_class() -> None:
    """Two patches just over the bar and one far over it: the point sits near the one that stands out (weights
    0.1, 0.1, 0.4), where weighting by the score itself (0.6, 0.6, 0.9) pulled it towards the fringe."""
    cls = np.array([[1, 1, 2]], np.uint8)
    score = np.array([[0.6, 0.6, 0.9]], np.float32)
    (d,) = _defects(defect_mask(cls, score, DefectRule(threshold=0.5)), cls, score)
    xs = [_centre(0, j)[1] for j in range(3)]
    assert d.x == pytest.approx((0.1 * xs[0] + 0.1 * xs[1] + 0.4 * xs[2]) / 0.6)
    assert d.area == 3 and d.class_ == 1 and d.score == pytest.approx(0.9)
    (plain,) = _defects(defect_mask(cls, score, DefectRule(threshold=0.5)), cls, score, threshold=None)
    assert plain.x == pytest.approx((0.6 * xs[0] + 0.6 * xs[1] + 0.9 * xs[2]) / 2.1)


def test_many_small_regions_each_get_their_own_defect_in_row_major_order() -> None:
    gh, gw = 9, 11
    mask = (np.add.outer(np.arange(gh), np.arange(gw)) % 2) == 0  # 4-connected: one region per cell
    cls = np.arange(gh * gw).reshape(gh, gw) % 3
    score = np.linspace(0.5, 1.0, gh * gw, dtype=np.float32).reshape(gh, gw)
    defects = _defects(mask, cls, score, connectivity=4)
    centres = grid_centres((gh, gw), PATCH, STRIDE, ORIGIN)
    cells = list(zip(*np.nonzero(mask), strict=True))
    assert len(defects) == len(cells)
    for d, (i, j) in zip(defects, cells, strict=True):
        assert (d.y, d.x) == pytest.approx((float(centres[i, j, 0]), float(centres[i, j, 1])))
        assert d.area == 1 and d.class_ == cls[i, j] and d.score == pytest.approx(float(score[i, j]))


def test_diagonal_neighbours_join_with_8_connectivity_only() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], bool)
    assert grid_regions(mask, 8).n == 2
    r = grid_regions(mask, 4)
    assert r.n == 3 and r.labels.tolist() == [[0, -1, -1], [-1, 1, -1], [-1, -1, -1], [2, 2, -1]]
    with pytest.raises(ValueError, match="connectivity"):
        grid_regions(mask, 6)  # type: ignore[arg-type]


def test_a_region_over_the_frame_share_is_withheld_and_the_note_says_why() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:6, :] = True  # 60 % of the frame
    mask[9, 9] = True  # a small one stays
    regions = grid_regions(mask)
    keep, note = publishable(regions, 0.05)
    assert keep.tolist() == [False, True]
    assert note is not None and "60 patches" in note and "max_share 0.05" in note
    corner = Regions(labels=np.array([0, 0, 0, 0] + [-1] * 12), n=1)  # a 2×2 block on a 4×4 grid: 25 %, yet kept
    assert publishable(corner, 0.05) == (np.array([True]), None)


def test_class_score_is_the_mass_on_the_defect_classes() -> None:
    prob = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
    np.testing.assert_allclose(class_score(prob, (1, 2)), [2 / 3, 0.0, 0.8], atol=1e-6)


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


def test_point_regions_match_a_full_distance_matrix_search() -> None:
    rng = np.random.default_rng(5)
    k = np.stack(np.meshgrid(np.arange(14), np.arange(11), indexing="ij"), -1).reshape(-1, 2)
    sets = [
        np.zeros((1, 2)),
        np.array([[0.0, 0.0], [0.0, 3.0]]),
        rng.random((150, 2)) * 100,
        k * 9.7 + rng.normal(0, 0.8, k.shape),  # a jittered lattice, as atoms are
        np.round(rng.random((80, 2)) * 12),  # coincident centres
        np.concatenate([rng.random((40, 2)) * 5, rng.random((30, 2)) * 400 + 1000]),  # two far clusters
    ]
    for pts in sets:
        for density in (0.0, 0.2, 0.6, 1.0):
            mask = rng.random(len(pts)) < density
            got = point_regions(mask, pts.astype(np.float32))
            want, n_want = _reference_points(mask, pts.astype(np.float32))
            assert got.n == n_want and np.array_equal(got.labels, want), (len(pts), density)


# ------------------------------------------------------------------ peaks: one defect per score peak

WIDE = (10**6, 10**6)  # a patch so wide that every two windows overlap: the depth rule everywhere


def _peak_defects(score: np.ndarray, patch: tuple[int, int] = PATCH) -> tuple[list, str | None]:
    """What the pipeline publishes from a grid score map (``STRIDE``) with the threshold 0.5 and no defect classes."""
    rule = DefectRule(threshold=0.5, max_share=0.05)
    cls = np.zeros(score.shape, np.uint8)
    regions = grid_regions(defect_mask(cls, score, rule))
    keep, note = publishable(regions, rule.max_share)
    centres = grid_centres(score.shape, PATCH, STRIDE, ORIGIN)
    peaks = grid_peaks(regions, score, centres, patch=patch, threshold=rule.threshold, split=keep)
    return regions_to_defects(peaks, centres, cls, score, kind="joint", keep=keep[peaks.region]), note


def _grid_peak_count(score: np.ndarray, mask: np.ndarray, patch: tuple[int, int]) -> int:
    centres = grid_centres(score.shape, PATCH, STRIDE, ORIGIN)
    return grid_peaks(grid_regions(mask), score, centres, patch=patch, threshold=0.5).n


def test_two_peaks_joined_by_a_flagged_bridge_are_two_defects_at_their_peaks() -> None:
    score = np.full((16, 18), 0.1, np.float32)  # 288 patches: the 9 flagged are under max_share 0.05
    score[3:5, 2:4] = [[0.90, 0.85], [0.80, 0.95]]  # a defect on a patch corner: a 2×2 block, one peak
    score[4, 4:7] = [0.62, 0.55, 0.66]  # the bridge: flagged, but well under both peaks
    score[4:6, 7] = [0.88, 0.75]  # the second defect, on two patches
    assert grid_regions(score >= 0.5).n == 1  # one connected region, as before the split
    for patch in (PATCH, WIDE):  # the dip is deep enough for either rule
        defects, note = _peak_defects(score, patch)
        assert note is None and len(defects) == 2
        a, b = sorted(defects, key=lambda d: d.x)
        assert (a.score, b.score) == pytest.approx((0.95, 0.88))
        assert (a.area, b.area) == (5, 4)  # the bridge's lowest patch goes with its highest neighbour (0.66)
        # each within one stride of its own patches (the bridge patches pull a little); one region gave a point between
        assert np.hypot(a.y - _centre(3.5, 2.5)[0], a.x - _centre(3.5, 2.5)[1]) < STRIDE[0]
        assert np.hypot(b.y - _centre(4.5, 7)[0], b.x - _centre(4.5, 7)[1]) < STRIDE[0]


def test_one_broad_blob_stays_one_defect_and_a_shallow_dip_splits_only_windows_that_do_not_overlap() -> None:
    score = np.full((16, 16), 0.1, np.float32)
    score[2:5, 2:5] = [[0.55, 0.80, 0.60], [0.82, 0.90, 0.86], [0.60, 0.88, 0.70]]  # a defect spread over its cells
    dip = 0.88 - 0.5 * PEAK_DEPTH * (0.88 - 0.5)  # maxima 0.9 and 0.88 four cells apart, a dip of half the depth rule
    score[7, 2:7] = [0.90, 0.85, dip, 0.86, 0.88]
    # 16-px windows four 8-px strides apart do not overlap: no point lights both maxima, so the dip parts them
    defects, _ = _peak_defects(score)
    assert sorted(d.area for d in defects) == [2, 3, 9]
    blob = next(d for d in defects if d.area == 9)
    assert (blob.y, blob.x) == pytest.approx(_centre(3, 3), abs=1.0)  # the blob is nearly symmetric about its peak
    # 48-px windows overlap at that distance: one defect could light both, and the dip is too shallow to part them
    assert sorted(d.area for d in _peak_defects(score, (48, 48))[0]) == [5, 9]


def test_a_peak_stands_alone_when_the_dip_passes_the_depth_share_of_its_height() -> None:
    """p − s > PEAK_DEPTH · (p − threshold) where windows overlap: the boundary on both sides, and a dip under the
    threshold splits; where they do not overlap any dip splits."""
    at = 0.8 - PEAK_DEPTH * (0.8 - 0.5)  # the saddle where the lower peak 0.8 starts to stand alone
    for saddle, want, want_apart in ((at + 0.02, 1, 2), (at - 0.02, 2, 2), (0.45, 2, 2), (0.8, 1, 1)):
        score = np.full((3, 7), 0.1, np.float32)
        score[1, 1:6] = [0.95, 0.9, saddle, 0.8, 0.7]  # (0.8: no dip at all, a shoulder)
        mask = score >= 0.5
        mask[1, 3] = True  # the saddle flagged even under the threshold (a defect class), so one region
        assert grid_regions(mask).n == 1
        assert _grid_peak_count(score, mask, WIDE) == want, (saddle, PEAK_DEPTH)
        assert _grid_peak_count(score, mask, (1, 1)) == want_apart, saddle


def test_a_region_over_the_share_is_withheld_whole_whatever_its_peaks() -> None:
    score = np.full((10, 10), 0.6, np.float32)  # a frame that lights up as a whole ...
    score[2, 2] = score[7, 7] = 0.95  # ... with two clear peaks in it
    score[0, 9] = 0.1
    defects, note = _peak_defects(score)
    assert defects == [] and note is not None and "99 patches" in note
    regions = grid_regions(score >= 0.5)
    centres = grid_centres(score.shape, PATCH, STRIDE, ORIGIN)
    whole = grid_peaks(regions, score, centres, patch=PATCH, threshold=0.5, split=np.array([False]))
    assert whole.n == 1 and whole.region.tolist() == [0]  # not even visited
    assert grid_peaks(regions, score, centres, patch=PATCH, threshold=0.5).n == 2


def test_class_flagged_regions_under_the_threshold_are_never_split() -> None:
    score = np.array([[0.3, 0.1, 0.2, 0.05, 0.4]], np.float32)  # three maxima, none over the threshold
    assert _grid_peak_count(score, np.ones(score.shape, bool), (1, 1)) == 1


def _reference_peaks(score: np.ndarray, pairs: list[tuple[int, int]], threshold: float, depth: float) -> set[int]:
    """The peaks that stand alone, from the definition: each local maximum's saddle by growing the superlevel set
    one patch at a time (descending score, ties by index) until its component holds a higher patch."""
    n = score.size
    order = sorted(range(n), key=lambda i: (-score[i], i))
    rank = {i: r for r, i in enumerate(order)}
    nb: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in pairs:
        nb[a].add(b)
        nb[b].add(a)
    kept = set()
    for p in range(n):
        if any(rank[q] < rank[p] for q in nb[p]):
            continue  # not a peak
        saddle = None
        for k in range(rank[p], n):
            inside = set(order[: k + 1])
            comp, todo = {p}, [p]
            while todo:
                for q in nb[todo.pop()] & inside:
                    if q not in comp:
                        comp.add(q)
                        todo.append(q)
            if any(rank[q] < rank[p] for q in comp):
                saddle = score[order[k]]
                break
        height = score[p] - threshold
        if saddle is None or (height > 0 and score[p] - saddle > depth * height):
            kept.add(p)
    return kept


def test_grid_peaks_match_the_definition_on_random_maps() -> None:
    """All windows overlapping (the depth rule) and none overlapping (any dip) against a brute-force search."""
    rng = np.random.default_rng(7)
    for trial in range(30):
        shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        score = np.round(rng.random(shape), 1 if trial % 3 == 0 else 3).astype(np.float32)  # some ties
        mask = rng.random(shape) < 0.7
        regions = grid_regions(mask)
        idx = np.arange(score.size).reshape(shape)
        pairs = []
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            for i in range(shape[0]):
                for j in range(shape[1]):
                    y, x = i + dy, j + dx
                    if y < shape[0] and 0 <= x < shape[1] and mask[i, j] and mask[y, x]:
                        pairs.append((int(idx[i, j]), int(idx[y, x])))
        flat = score.reshape(-1).astype(np.float64)
        masked = np.where(mask.reshape(-1), flat, -np.inf)  # off-mask patches never join a component
        centres = grid_centres(shape, PATCH, STRIDE, ORIGIN)
        for patch, depth in ((WIDE, PEAK_DEPTH), ((1, 1), 0.0)):
            peaks = grid_peaks(regions, score, centres, patch=patch, threshold=0.4)
            want = {p for p in _reference_peaks(masked, pairs, 0.4, depth) if mask.reshape(-1)[p]}
            got = set()  # each peak's label holds its highest patch; patches of one label lie in one region
            for k in range(peaks.n):
                cells = np.nonzero(peaks.labels.reshape(-1) == k)[0]
                got.add(int(cells[np.lexsort((cells, -flat[cells]))[0]]))
                assert np.unique(regions.labels.reshape(-1)[cells]).tolist() == [peaks.region[k]]
            assert got == want, (trial, patch)


def test_point_peaks_split_two_atoms_linked_by_flagged_atoms_and_keep_a_blob_whole() -> None:
    k = np.stack(np.meshgrid(np.arange(12), np.arange(12), indexing="ij"), -1).reshape(-1, 2)
    pts = (k * 10.0 + np.random.default_rng(2).normal(0, 0.5, k.shape)).astype(np.float32)
    score = np.full(len(pts), 0.1, np.float32)
    at = {tuple(v): i for i, v in enumerate(k.tolist())}
    for ij, v in (((3, 2), 0.95), ((3, 3), 0.8), ((3, 4), 0.58), ((3, 5), 0.7), ((3, 6), 0.9)):
        score[at[ij]] = v  # a defect lighting two atoms, a flagged atom between, and a second defect on two atoms
    for ij, v in (((8, 8), 0.92), ((8, 9), 0.85), ((9, 8), 0.86), ((9, 9), 0.8)):
        score[at[ij]] = v  # a third, on four atoms with no dip: one defect
    mask = score >= 0.5
    regions = point_regions(mask, pts)
    assert regions.n == 2
    peaks = point_peaks(regions, score, pts, patch=(24, 24), threshold=0.5)
    assert peaks.n == 3 and peaks.region.tolist() == [0, 0, 1]
    defects = regions_to_defects(peaks, pts, np.zeros(len(pts), np.uint8), score, kind="joint")
    # the atom between goes with its higher neighbour (0.8); each point lies within half a spacing of its defect
    for (y, x), area, top in (((3, 2.5), 3, 0.95), ((3, 5.5), 2, 0.9), ((8.5, 8.5), 4, 0.92)):
        (d,) = [d for d in defects if np.hypot(d.y - y * 10, d.x - x * 10) < 5]
        assert d.area == area and d.score == pytest.approx(top)
    assert sum(d.area for d in defects) == int(mask.sum())


# ------------------------------------------------------------------ the score


def _lattice_features(gh: int, gw: int, seed: int) -> np.ndarray:
    """Features of a grid where every cell is alike up to noise, plus a slow gradient (an interface, a dose drift)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 3, gh)[:, None, None] * np.ones((gh, gw, 1))
    return (rng.normal(0, 0.1, (gh, gw, 5)) + ramp).reshape(gh * gw, 5)


def test_contrast_finds_the_odd_patch_and_ignores_a_slow_gradient() -> None:
    f = _lattice_features(20, 20, seed=0)
    f[7 * 20 + 11] += 1.0  # one patch unlike its neighbours
    nb = grid_neighbours((20, 20), 1)
    c = contrast(f, nb, np.full(5, 0.1))
    assert int(c.argmax()) == 7 * 20 + 11
    assert np.sort(c)[-2] < 0.5 * c.max()


def test_calibrated_score_is_robust_to_defects_in_training_and_clean_frames_stay_below() -> None:
    nb = grid_neighbours((30, 30), 1)
    train = np.concatenate([_lattice_features(30, 30, seed=s) for s in range(4)])
    nb_train = np.concatenate([np.where(nb >= 0, nb + 900 * s, -1) for s in range(4)])
    train[::50] += 2.0  # 2 % of the training patches are defects: the threshold must not rise to them
    stats = fit_novelty(train, nb_train, kind="combined")
    s_train = novelty_score(train, nb_train, stats)
    assert (s_train[::50] >= 0.5).all()
    share = float(np.mean(s_train >= 0.5))
    assert share < 0.06 and stats.train_share_over["combined"] == pytest.approx(share)
    clean = novelty_score(_lattice_features(30, 30, seed=9), nb, stats)
    assert (clean < 0.5).mean() > 0.99
    odd = _lattice_features(30, 30, seed=9)
    odd[100] += 2.0
    assert novelty_score(odd, nb, stats)[100] > 0.8  # far over the threshold (0.5)


def test_a_frame_unlike_training_publishes_what_stands_out_in_it_not_a_flood() -> None:
    """The frame's own bar: noisier everywhere (another region, another contrast) raises the bar, not the count."""
    nb = grid_neighbours((30, 30), 1)
    train = np.concatenate([_lattice_features(30, 30, seed=s) for s in range(4)])
    nb_train = np.concatenate([np.where(nb >= 0, nb + 900 * s, -1) for s in range(4)])
    stats = fit_novelty(train, nb_train, kind="contrast")
    noisy = _lattice_features(30, 30, seed=9) + np.random.default_rng(1).normal(0, 0.3, (900, 5))
    noisy[100] += 4.0  # one patch that stands out even here
    scale = np.asarray(stats.scale)
    raw = contrast(noisy, nb, scale) / stats.contrast_threshold
    assert (raw >= 1).mean() > 0.3  # against the training bar alone a third of the frame would be "defects"
    score = novelty_score(noisy, nb, stats)
    assert (score >= 0.5).mean() < 0.02 and score[100] >= 0.5
    # a frame like training keeps the calibrated threshold (its own bar is lower)
    clean = _lattice_features(30, 30, seed=9)
    plain = _published(contrast(clean, nb, scale) / stats.contrast_threshold)
    assert np.allclose(novelty_score(clean, nb, stats), plain)


def _published(s: np.ndarray) -> np.ndarray:
    return (s / (1 + s)).astype(np.float32)


def test_point_neighbours_are_the_nearest_others_and_pad_when_few() -> None:
    pts = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert point_neighbours(pts, 1).ravel().tolist() == [1, 0, 1]
    assert point_neighbours(pts, 3).tolist()[0] == [1, 2, -1]


@pytest.mark.parametrize(
    "neighbours",
    [
        grid_neighbours((9, 7), 1),  # interior (8), edges (5) and corners (3)
        grid_neighbours((6, 11), 2),
        point_neighbours(np.random.default_rng(1).random((40, 2)) * 5, 6),
        point_neighbours(np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), 4),  # padded rows: 2 neighbours of 4
        np.array([[-1, -1], [0, -1], [1, 0]]),  # a patch with no neighbour at all
    ],
)
def test_contrast_takes_the_median_of_the_neighbours_present(neighbours: np.ndarray) -> None:
    """The grouped, sorted median equals the definition: each patch against the median of only the neighbours that
    exist, feature by feature (NaN-padded nanmedian, the slow form it replaced); no neighbour: contrast 0."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(neighbours.shape[0], 5))
    scale = rng.uniform(0.5, 2.0, 5)
    present = neighbours >= 0
    gathered = np.where(present[..., None], f[np.clip(neighbours, 0, None)], np.nan)
    has = present.any(axis=1)
    median = f.copy()
    median[has] = np.nanmedian(gathered[has], axis=1)
    m = np.maximum(present.sum(axis=1), 1)
    full = neighbours.shape[1]
    want = np.sqrt((((f - median) / scale) ** 2).sum(axis=1)) / np.sqrt(
        (1 + np.pi / (2 * m)) / (1 + np.pi / (2 * full))
    )
    np.testing.assert_allclose(contrast(f, neighbours, scale), np.where(has, want, 0.0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ served, calibrated on training frames


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LatticeConfig]:
    """An encoder calibrated on a defect-free 16-px lattice cut at a 16-px stride (one lattice period)."""
    lattice = LatticeConfig(shape=(128, 128), n_defects=0, interface=False, drift=(0.0, 0.0), lattice_constant=16.0)
    frames, _ = synth_scan(lattice, 4, seed=3)
    path = make_artifact(
        tmp_path_factory.mktemp("calibrated"), stride=(16, 16), translation=True, calibrate_on=frames, seed=4
    )
    return path, lattice


def _later_looks(lattice: LatticeConfig, n: int, **update: object) -> tuple[np.ndarray, list]:
    """Frames 4.. of the calibration scan's sample: the same material seen again, with fresh noise."""
    frames, truths = synth_scan(lattice.model_copy(update=update), 4 + n, seed=3)
    return frames[4:], truths[4:]


def test_a_clean_frame_publishes_no_defect_and_a_foreign_one_no_frame_sized_region(
    calibrated: tuple[Path, LatticeConfig],
) -> None:
    path, lattice = calibrated
    pipeline = Pipeline(load(path, backend="onnx", device="cpu", batch_sizes=(1,)))
    assert pipeline.manifest.novelty is not None and pipeline.manifest.novelty.grid_step == 1
    clean, _ = _later_looks(lattice, 3)
    for frame in clean:
        maps = pipeline.process(frame)
        assert maps.defects == [] and maps.defects_note is None
    foreign = np.random.default_rng(0).random((128, 128)).astype(np.float32) * clean.max()  # noise, no lattice
    maps = pipeline.process(foreign)
    assert all(d.area <= 0.05 * maps.arrays["defect_score"].size for d in maps.defects)
    if (maps.arrays["defect_score"] >= 0.5).mean() > 0.05:
        assert maps.defects_note is not None and "withheld" in maps.defects_note


def test_bright_and_missing_columns_are_published_near_where_they_are(calibrated: tuple[Path, LatticeConfig]) -> None:
    path, lattice = calibrated
    pipeline = Pipeline(load(path, backend="onnx", device="cpu", batch_sizes=(1,)))
    frames, truths = _later_looks(lattice, 1, n_defects=6, defect_kinds=("bright", "vacancy"))
    maps = pipeline.process(frames[0])
    found = np.array([[d.y, d.x] for d in maps.defects]).reshape(-1, 2)
    truth = truths[0].defects
    assert len(found) >= 1 and all(d.kind == "joint" for d in maps.defects)
    d = np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1])
    assert (d.min(axis=1) <= 16).all()  # every published defect is within a lattice period of a true one
    score = maps.arrays["defect_score"]
    cells = np.clip((truth // 16).astype(int), 0, np.array(score.shape) - 1)
    on_defects = score[cells[:, 0], cells[:, 1]]
    assert np.median(on_defects) >= 0.5  # most patches holding a defect are over the calibrated threshold
    assert (score >= 0.5).mean() < 0.15  # and few others are


def test_the_residual_kind_keeps_only_the_residual_part_and_publishes_under_its_name(
    calibrated: tuple[Path, LatticeConfig], tmp_path: Path
) -> None:
    """``--defect-score residual``: the joint score less the likelihood part — its statistics hold the residual part
    only (a manifest claiming otherwise is refused), clean frames publish nothing, a defect is published as such."""
    _, lattice = calibrated
    training, _ = synth_scan(lattice, 4, seed=3)
    path = make_artifact(
        tmp_path, stride=(16, 16), translation=True, calibrate_on=training, seed=4, defect_score="residual"
    )
    pipeline = Pipeline(load(path, backend="onnx", device="cpu", batch_sizes=(1,)))
    stats = pipeline.manifest.novelty
    assert stats is not None and stats.kind == "residual" and [p.source for p in stats.parts] == ["residual"]
    assert stats.needs_reconstruction
    with pytest.raises(ValueError, match="reconstruction parts"):
        type(stats).model_validate({**stats.model_dump(), "parts": []})
    clean, _ = _later_looks(lattice, 2)
    assert all(pipeline.process(frame).defects == [] for frame in clean)
    frames, truths = _later_looks(lattice, 1, n_defects=6, defect_kinds=("bright", "vacancy"))
    maps = pipeline.process(frames[0])
    assert maps.defects and all(d.kind == "residual" for d in maps.defects)
    found = np.array([[d.y, d.x] for d in maps.defects])
    truth = truths[0].defects
    assert (np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1]).min(1) <= 16).all()


def test_the_frames_own_bar_takes_the_calibrated_k() -> None:
    """An artifact exported at ``--defect-k 3`` moves both bars: the training threshold and each frame's own."""
    nb = grid_neighbours((30, 30), 1)
    train = np.concatenate([_lattice_features(30, 30, seed=s) for s in range(4)])
    nb_train = np.concatenate([np.where(nb >= 0, nb + 900 * s, -1) for s in range(4)])
    noisy = _lattice_features(30, 30, seed=9) + np.random.default_rng(1).normal(0, 0.3, (900, 5))
    for k in (3.0, 6.0):
        stats = fit_novelty(train, nb_train, kind="contrast", k=k)
        assert stats.contrast_threshold == pytest.approx(stats.contrast_median + k * stats.contrast_sd)
        raw = contrast(noisy, nb, np.asarray(stats.scale)) / stats.contrast_threshold
        med = np.median(raw)
        bar = med + k * 1.4826 * np.median(np.abs(raw - med))
        assert bar > 1  # this frame's own bar is the higher one, at either k
        np.testing.assert_allclose(novelty_score(noisy, nb, stats), _published(raw / bar), rtol=1e-6)
