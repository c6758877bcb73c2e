"""The service's fast preprocessing paths give the values of the plain ones (training uses the plain ones).

Frame percentiles by selection instead of a sort, the frame normalisation with fewer temporaries, and patches
written straight into a batch buffer piece by piece: each is checked against the straightforward computation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamer.maps.preprocess import (
    Preprocessing,
    _normalise,
    _quantiles,
    _ranks_in_float64,
    prepare_frame,
    prepare_patches,
)
from streamer.maps.tiling import TilingError, patch_range, tile_grid

SPECS = {
    "plain": Preprocessing(frame_norm="none"),
    "minmax": Preprocessing(patch_norm="minmax"),
    "fft": Preprocessing(fft="logmag"),
    "fft+hann+minmax": Preprocessing(fft="logmag", window="hann", patch_norm="minmax"),
}


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.tensor([3.0]), torch.tensor([2.0, -1.0]), torch.zeros(17)]
    for n in (5, 64, 999, 4096):
        out += [
            torch.rand(n, generator=g),
            torch.randint(0, 4, (n,), generator=g).float(),  # many ties
            torch.randn(n, generator=g) * 1e6,
        ]
    return out


def test_the_rank_rule_read_from_the_version_is_what_the_installed_torch_does() -> None:
    """torch < 2.14 computes quantile ranks in q's dtype, 2.14 on in float64: the version number must say which
    (it is read without importing torch, so a torch-free serving process rounds as the training process did)."""
    x = (torch.arange(64, dtype=torch.float64) * 0.7548776662466927).frac().float().sort().values
    q = torch.tensor([0.01, 0.99])  # on these 64 values the two ways round differently
    ranks = q.to(torch.float64) * 63
    below = ranks.floor()
    as64 = torch.lerp(x[below.long()], x[ranks.ceil().long()], (ranks - below).to(torch.float32))
    assert torch.equal(torch.quantile(x, q), as64) == _ranks_in_float64()


@pytest.mark.parametrize("q", [(0.005, 0.995), (0.0, 1.0), (0.5, 0.5), (0.3, 0.31), (0.123, 0.877)])
def test_quantiles_by_selection_equal_torch_quantile_exactly(q: tuple[float, float]) -> None:
    qt = torch.tensor(q)
    for x in _samples():
        assert torch.equal(_quantiles(x, q), torch.quantile(x, qt)), (x.numel(), q)


@pytest.mark.parametrize("q", [(0.005, 0.995), (0.0, 1.0), (0.3, 0.31), (0.123, 0.877)])
def test_quantiles_by_numpy_partition_equal_torch_quantile_exactly(q: tuple[float, float]) -> None:
    """The host reference (numpy alone, no torch) reproduces torch.quantile bit for bit."""
    qt = torch.tensor(q)
    for x in _samples():
        got = _quantiles(x.numpy(), q)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert torch.equal(torch.from_numpy(got), torch.quantile(x, qt)), (x.numel(), q)


def test_quantiles_with_nan_are_nan_like_torch_quantile() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, 5.0])
    assert torch.isnan(torch.quantile(x, torch.tensor([0.1, 0.9]))).all()
    assert torch.isnan(_quantiles(x, (0.1, 0.9))).all()
    assert np.isnan(_quantiles(x.numpy(), (0.1, 0.9))).all()


def _frames() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [
        rng.random((61, 37), dtype=np.float32) * 3 - 1,
        (rng.random((40, 53)) * 60000).astype(np.uint16),
        (rng.random((17, 90)) * 900 - 450).astype(np.int16),
        (rng.random((33, 33)) * 255).astype(np.uint8),
        rng.random((29, 31)) * 1e5,  # float64
        rng.random((24, 24)).astype(np.float16),
        np.full((20, 20), 7.0, np.float32),  # constant: hi == lo
        rng.random((3, 16, 16), dtype=np.float32),  # a stack, as training normalises one
    ]


@pytest.mark.parametrize(
    "spec",
    [
        Preprocessing(),
        Preprocessing(frame_percentiles=(0.0, 100.0)),
        Preprocessing(frame_norm="fixed", fixed_range=(0.1, 299.7)),  # bounds float32 cannot hold exactly
        Preprocessing(frame_norm="none"),
    ],
    ids=["percentile", "min-max", "fixed", "none"],
)
def test_the_numpy_path_of_the_cpu_equals_the_torch_path_exactly(spec: Preprocessing) -> None:
    """The CPU runs the normalisation in numpy (one thread), other devices in torch: same values, bit for bit."""
    for frame in _frames():
        want = _normalise(torch.from_numpy(frame.astype(np.int32) if frame.dtype == np.uint16 else frame), spec)
        view = frame.copy()
        view.setflags(write=False)  # as a frame decoded from a message is
        host = prepare_frame(view, spec)
        assert isinstance(host, np.ndarray) and host.dtype == np.float32  # numpy in, numpy out
        for got in (torch.from_numpy(host), prepare_frame(torch.from_numpy(frame.copy()), spec)):
            assert got.dtype == torch.float32 and torch.equal(got, want), (frame.dtype, frame.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.uint8, torch.int16])
def test_frame_normalisation_equals_the_plain_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    frame = (torch.rand(61, 37, generator=g, dtype=torch.float64) * 200).to(dtype)
    spec = Preprocessing(frame_percentiles=(2.0, 97.0))
    x = frame.to(torch.float32)
    lo, hi = (float(v) for v in torch.quantile(x[::4, ::4].reshape(-1), torch.tensor([0.02, 0.97])))
    want = ((x - lo) * (1.0 / (hi - lo))).clamp(0.0, 1.0)
    got = prepare_frame(frame, spec)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got.data_ptr() != frame.data_ptr()  # a new tensor: the caller's frame is never written


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_patches_written_piecewise_into_a_buffer_equal_the_plain_result(name: str, kind: str) -> None:
    spec = SPECS[name]
    g = torch.Generator().manual_seed(2)
    raw = torch.rand(45, 38, generator=g) * 9
    frame = prepare_frame(raw.numpy() if kind == "numpy" else raw, spec)
    tiles = tile_grid(frame, (8, 6), (5, 3), (2, 1))  # awkward grid: 8 x 11 patches
    want = torch.as_tensor(prepare_patches(tiles, spec))
    n = want.shape[0]
    buffer = torch.full((n + 5, 1, 8, 6), -1.0)  # larger than needed, as a reused buffer is
    for start, stop in ((0, n), (0, 4), (4, 30), (30, n), (12, 13), (22, 22)):
        out = buffer[: stop - start]
        written = 0
        for piece in patch_range(tiles, start, stop):
            k = math.prod(piece.shape) // (8 * 6)
            target = out[written : written + k]
            got = prepare_patches(piece, spec, out=target.numpy() if kind == "numpy" else target)
            assert got.shape == (k, 1, 8, 6) and type(got) is type(piece)
            written += k
        assert written == stop - start
        if spec.fft == "none":
            assert torch.equal(out, want[start:stop]), (start, stop)
        else:  # FFTs of different batch sizes may round differently
            torch.testing.assert_close(out, want[start:stop], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_numpy_patches_equal_torch_patches(name: str) -> None:
    """The CPU serving path (numpy, no torch) and the GPU path (torch) cut and transform the same patches: exactly
    without an FFT, within float32 rounding of two FFT libraries with one."""
    spec = SPECS[name]
    raw = np.random.default_rng(5).random((45, 38), dtype=np.float32) * 9
    host = prepare_patches(tile_grid(prepare_frame(raw, spec), (8, 6), (5, 3), (2, 1)), spec)
    device = prepare_patches(tile_grid(_normalise(torch.from_numpy(raw), spec), (8, 6), (5, 3), (2, 1)), spec)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32 and host.shape == (88, 1, 8, 6)
    if spec.fft == "none":
        assert torch.equal(torch.from_numpy(host), device)
    else:
        torch.testing.assert_close(torch.from_numpy(host), device, atol=1e-5, rtol=1e-4)  # DC term: ~0 ± rounding


def test_a_buffer_of_the_wrong_shape_or_type_is_refused() -> None:
    tiles = torch.rand(3, 4, 8, 8)
    with pytest.raises(ValueError, match=r"contiguous float32 array of shape \(12, 1, 8, 8\)"):
        prepare_patches(tiles, SPECS["plain"], out=torch.empty(12, 8, 8))
    with pytest.raises(ValueError, match="out is a ndarray but the patches are a Tensor"):
        prepare_patches(tiles, SPECS["fft"], out=np.empty((12, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="float64"):
        prepare_patches(tiles, SPECS["plain"], out=torch.empty(12, 1, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("grid", [(1, 1), (1, 6), (4, 1), (3, 5)])
def test_patch_range_is_every_range_in_row_major_order_as_at_most_three_views(grid: tuple[int, int]) -> None:
    gh, gw = grid
    tiles = torch.arange(gh * gw * 4, dtype=torch.float32).reshape(gh, gw, 2, 2)
    flat = tiles.reshape(-1, 2, 2)
    for start in range(gh * gw + 1):
        for stop in range(start, gh * gw + 1):
            pieces = patch_range(tiles, start, stop)
            assert len(pieces) <= 3
            assert all(p.untyped_storage().data_ptr() == tiles.untyped_storage().data_ptr() for p in pieces)
            got = torch.cat([p.reshape(-1, 2, 2) for p in pieces]) if pieces else flat[:0]
            assert torch.equal(got, flat[start:stop]), (start, stop)


def test_patch_range_of_a_stack_and_of_a_bad_shape() -> None:
    stack = torch.rand(9, 3, 3)
    assert torch.equal(patch_range(stack, 2, 7)[0], stack[2:7])
    assert patch_range(stack, 4, 4) == []
    with pytest.raises(TilingError, match=r"\(gh, gw, ph, pw\) or \(N, ph, pw\)"):
        patch_range(torch.rand(3, 3), 0, 1)


def test_the_numpy_copy_writes_what_torch_would() -> None:
    """The CPU copy goes through numpy (one thread); a strided unfold view must land row-major, like copy_; and
    numpy's strided sliding windows cut the same grid as torch's unfold."""
    raw = np.random.default_rng(3).random((30, 30), dtype=np.float32)
    tiles = tile_grid(torch.from_numpy(raw), 7, 4)
    out = torch.empty(tiles.shape[0] * tiles.shape[1], 1, 7, 7)
    prepare_patches(tiles, SPECS["plain"], out=out)
    assert torch.equal(out, tiles.reshape(-1, 1, 7, 7))
    host_tiles = tile_grid(raw, 7, 4)
    assert np.shares_memory(host_tiles, raw)  # a view, as unfold is
    assert torch.equal(torch.from_numpy(np.ascontiguousarray(host_tiles)), tiles)
