"""``streamer.maps.median_network``: the defect score's neighbour median by a sorting network equals numpy's median
exactly, for every neighbour count the score meets (1–16), with ties and pad slots; and the grid/point residuals it
feeds are unchanged against a plain per-row median."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.maps.median_network import median_of, network
from streamer.maps.novelty import _residuals, grid_neighbours, point_neighbours


@pytest.mark.parametrize("n", range(1, 17))
def test_median_of_equals_numpy_with_ties(n: int) -> None:
    rng = np.random.default_rng(n)
    slabs = [rng.integers(0, 4, size=(300, 5)).astype(np.float64) for _ in range(n)]  # many ties
    assert np.array_equal(median_of(slabs), np.median(np.stack(slabs), axis=0))
    slabs = [rng.normal(size=(300, 5)) for _ in range(n)]
    assert np.array_equal(median_of(slabs), np.median(np.stack(slabs), axis=0))


def test_network_keeps_only_what_the_middle_needs() -> None:
    assert network(1) == () and network(2) == ((0, 1),)
    full16 = 63  # Batcher's odd-even merge sort of 16 inputs
    assert 0 < len(network(16)) < full16
    with pytest.raises(ValueError, match="at least one value"):
        network(0)


@pytest.mark.parametrize(
    "neighbours",
    [
        grid_neighbours((23, 31), 1),
        grid_neighbours((23, 31), 2, 2),
        point_neighbours(np.random.default_rng(3).uniform(0, 80, (400, 2)), 6),
    ],
    ids=["grid", "grid-span-2", "points"],
)
def test_residuals_match_a_per_row_median(neighbours: np.ndarray) -> None:
    f = np.random.default_rng(4).normal(size=(neighbours.shape[0], 7))
    r, has = _residuals(f, neighbours)
    for i in range(0, len(f), 17):
        idx = neighbours[i][neighbours[i] >= 0]
        want = f[i] - np.median(f[idx], axis=0) if len(idx) else np.zeros(7)
        assert has[i] == bool(len(idx))
        assert np.array_equal(r[i], want)


@pytest.mark.parametrize("n", [2, 3, 8, 13, 16])
def test_float32_slabs_give_the_float64_median_bit_for_bit(n: int) -> None:
    # what the served score relies on: its 64 redrawn values a patch are gathered and sorted in float32, and only
    # the middle pair is averaged in float64 (an average in float32 would round differently)
    rng = np.random.default_rng(10 + n)
    slabs = [rng.normal(size=(500, 9)).astype(np.float32) for _ in range(n)]
    got = median_of(slabs, dtype="float64")
    want = np.median(np.stack([s.astype(np.float64) for s in slabs]), axis=0)
    assert got.dtype == np.float64 and np.array_equal(got, want)


def test_residuals_of_float32_features_equal_those_of_their_float64_copies() -> None:
    neighbours = grid_neighbours((19, 23), 2, 2)  # every count from 3 to 16: odd and even middles
    f = np.random.default_rng(5).normal(size=(neighbours.shape[0], 11)).astype(np.float32)
    r32, has32 = _residuals(f, neighbours)
    r64, has64 = _residuals(f.astype(np.float64), neighbours)
    assert r32.dtype == np.float64 and np.array_equal(r32, r64) and np.array_equal(has32, has64)
