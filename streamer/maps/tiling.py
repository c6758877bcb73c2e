"""Cutting frames into patches: a regular grid (``unfold`` views) or patches centred on given points.

Grid convention (DESIGN.md, "maps"): patch (i, j) covers rows ``y0 + i*sy … y0 + i*sy + ph`` and columns
``x0 + j*sx … x0 + j*sx + pw``. Only whole patches are cut: when ``H - y0 - ph`` is not a multiple of ``sy`` the last
``(H - y0 - ph) % sy`` rows are not covered (likewise for columns). That keeps every patch the same size, which the
encoder needs, and keeps the map a plain grid; a caller who wants the far edge covered moves ``origin``.

These are pure array functions, written once for numpy and torch (``streamer.maps.arrays``): they return the
frame's kind of array on the frame's device, and the same code cuts patches for training (``models.data``) and for
serving (``streamer.maps.pipeline``).
"""

from __future__ import annotations

from numpy.lib.stride_tricks import sliding_window_view

from streamer.maps.arrays import Array, arange, asarray_like, astype, floor, is_floating, is_tensor

__all__ = ["TilingError", "gather_points", "grid_shape", "patch_range", "points_in_bounds", "tile_grid"]


class TilingError(ValueError):
    """A patch size, stride or origin that cannot tile the frame."""


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise TilingError(f"{name} must be one int or a pair, got {value!r}")
    return int(value[0]), int(value[1])


def grid_shape(
    frame_hw: tuple[int, int],
    patch: int | tuple[int, int],
    stride: int | tuple[int, int],
    origin: tuple[int, int] = (0, 0),
) -> tuple[int, int]:
    """Number of whole patches (rows, columns) that fit; raises when not even one does."""
    (h, w), (ph, pw), (sy, sx), (y0, x0) = (
        frame_hw,
        _pair(patch, "patch"),
        _pair(stride, "stride"),
        _pair(origin, "origin"),
    )
    if ph < 1 or pw < 1 or sy < 1 or sx < 1:
        raise TilingError(f"patch {ph}x{pw} and stride {sy}x{sx} must be positive")
    if y0 < 0 or x0 < 0:
        raise TilingError(f"origin ({y0}, {x0}) must be non-negative")
    if h - y0 < ph or w - x0 < pw:
        raise TilingError(
            f"a {ph}x{pw} patch at origin ({y0}, {x0}) does not fit in a {h}x{w} frame; use a smaller patch"
        )
    return (h - y0 - ph) // sy + 1, (w - x0 - pw) // sx + 1


def tile_grid(
    frame: Array,
    patch: int | tuple[int, int],
    stride: int | tuple[int, int],
    origin: tuple[int, int] = (0, 0),
) -> Array:
    """Patches of a 2-D frame as a ``(gh, gw, ph, pw)`` view (no copy) on the frame's device."""
    if frame.ndim != 2:
        raise TilingError(f"frame must be 2-D, got shape {tuple(frame.shape)}")
    (ph, pw), (sy, sx), (y0, x0) = _pair(patch, "patch"), _pair(stride, "stride"), _pair(origin, "origin")
    gh, gw = grid_shape((frame.shape[0], frame.shape[1]), (ph, pw), (sy, sx), (y0, x0))
    region = frame[y0 : y0 + (gh - 1) * sy + ph, x0 : x0 + (gw - 1) * sx + pw]
    if is_tensor(region):
        return region.unfold(0, ph, sy).unfold(1, pw, sx)
    return sliding_window_view(region, (ph, pw))[::sy, ::sx]


def patch_range(tiles: Array, start: int, stop: int) -> list[Array]:
    """Patches ``start:stop`` (row-major) of a ``(gh, gw, ph, pw)`` grid or an ``(N, ph, pw)`` stack, as views.

    A range of a grid crosses grid rows, which no single view can express: it comes back as at most three pieces —
    the tail of a first row ``(k, ph, pw)``, whole rows ``(r, gw, ph, pw)``, the head of a last row — in order. The
    service cuts its encoder batches this way, so patches are copied once, straight into the batch.
    """
    if tiles.ndim == 3:
        return [tiles[start:stop]] if stop > start else []
    if tiles.ndim != 4:
        raise TilingError(f"tiles must be (gh, gw, ph, pw) or (N, ph, pw), got shape {tuple(tiles.shape)}")
    gw = int(tiles.shape[1])
    pieces: list[Array] = []
    row, col = divmod(start, gw)
    if col and start < stop:  # the tail of a partly taken row
        end = min(gw, col + stop - start)
        pieces.append(tiles[row, col:end])
        start += end - col
        row += 1
    whole = (stop - start) // gw
    if whole:
        pieces.append(tiles[row : row + whole])
        start += whole * gw
        row += whole
    if stop > start:
        pieces.append(tiles[row, : stop - start])
    return pieces


def points_in_bounds(centers: Array, frame_hw: tuple[int, int], patch: int | tuple[int, int]) -> Array:
    """Which centres (N×2, y and x) have their whole patch inside the frame (every sampled position, sub-pixel)."""
    ph, pw = _pair(patch, "patch")
    top, left = _corners(centers, ph, pw)
    return (top >= 0) & (left >= 0) & (top + ph - 1 <= frame_hw[0] - 1) & (left + pw - 1 <= frame_hw[1] - 1)


def _corners(centers: Array, ph: int, pw: int) -> tuple[Array, Array]:
    """Sub-pixel position of each patch's top-left sample: the centre sits on pixel ``(ph // 2, pw // 2)``."""
    c = astype(centers, "float64")
    return c[:, 0] - ph // 2, c[:, 1] - pw // 2


def gather_points(frame: Array, centers: Array, patch: int | tuple[int, int]) -> tuple[Array, Array]:
    """Patches centred on the sub-pixel ``centers`` (N×2, y and x): ``(patches (M, ph, pw), kept (N,) bool)``.

    Each patch is sampled by bilinear interpolation so that its centre column sits exactly on pixel
    ``(ph // 2, pw // 2)``, not up to half a pixel off (rounding would add ±0.5 px of noise to a polarisation signal
    of about that size); whole-pixel centres give the frame's pixels unchanged.

    Centres whose patch would cross the frame edge are skipped rather than padded: a padded patch looks like a
    different material to the encoder. ``kept`` says which centres the patches belong to.
    """
    if frame.ndim != 2:
        raise TilingError(f"frame must be 2-D, got shape {tuple(frame.shape)}")
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise TilingError(f"centers must be N×2 (y, x), got shape {tuple(centers.shape)}")
    ph, pw = _pair(patch, "patch")
    centers = asarray_like(centers, frame)
    kept = points_in_bounds(centers, (frame.shape[0], frame.shape[1]), (ph, pw))
    top, left = _corners(centers[kept], ph, pw)
    y0, x0 = floor(top), floor(left)
    dtype = str(frame.dtype).removeprefix("torch.") if is_floating(frame) else "float32"
    ty, tx = astype(top - y0, dtype)[:, None, None], astype(left - x0, dtype)[:, None, None]
    h, w = int(frame.shape[0]), int(frame.shape[1])
    rows = astype(y0, "int64")[:, None] + arange(0, ph, like=frame)
    cols = astype(x0, "int64")[:, None] + arange(0, pw, like=frame)
    r0, c0 = rows[:, :, None], cols[:, None, :]
    r1, c1 = (r0 + 1).clip(None, h - 1), (c0 + 1).clip(None, w - 1)  # weight 0 wherever the clamp bites
    f = astype(frame, dtype)
    top_row = f[r0, c0] * (1 - tx) + f[r0, c1] * tx
    bottom_row = f[r1, c0] * (1 - tx) + f[r1, c1] * tx
    return top_row * (1 - ty) + bottom_row * ty, kept
