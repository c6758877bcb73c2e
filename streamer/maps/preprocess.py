"""The one preprocessing path shared by training and serving.

``models.data`` builds training patches with these functions and the exporter writes the ``Preprocessing`` it used
into the artifact's manifest; ``streamer.maps.pipeline`` reads it back and calls the same functions on live frames. So a
change here changes both halves together, which is the point.

Order: frame normalisation → cut patches (grid or points) → optional FFT (log magnitude) → optional per-patch
min-max. The result is float32, shape ``(N, 1, ph, pw)``, values in [0, 1] when any normalisation is on (the
Bernoulli likelihood of the model needs that range).

Every function takes a numpy array or a torch tensor and returns the same kind on the same device
(``streamer.maps.arrays``): numpy on the CPU serving path, which needs no torch, and torch tensors on the GPU path.
On the host, the frame normalisation runs in numpy whichever kind came in, so training (torch tensors on the CPU)
and CPU serving (numpy) get the same values bit for bit.
"""

from __future__ import annotations

import math
import sys
from functools import cache
from importlib import metadata
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from streamer.maps.arrays import Array, amax, amin, asarray_like, astype, copy_into, dtype_name, is_tensor, on_gpu
from streamer.maps.spectral import Window, log_magnitude
from streamer.maps.tiling import gather_points, tile_grid

__all__ = ["Preprocessing", "grid_patches", "point_patches", "prepare_frame", "prepare_patches"]

_PERCENTILE_SUBSAMPLE = 4  # estimate frame percentiles on every 4th row and column: 16x cheaper, same answer


class Preprocessing(BaseModel):
    """How raw detector values become encoder input. Saved in the manifest; nothing here is guessed at serve time.

    ``frame_norm="percentile"`` maps the frame's ``frame_percentiles`` to 0 and 1 and clips, which is robust to
    hot pixels and to gain changes between sessions. ``"fixed"`` maps ``fixed_range`` to [0, 1] (for instruments with
    calibrated counts). ``patch_norm="minmax"`` rescales each patch to [0, 1] (the natural choice after the FFT).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    frame_norm: Literal["none", "percentile", "fixed"] = "percentile"
    frame_percentiles: tuple[float, float] = (0.5, 99.5)
    fixed_range: tuple[float, float] = (0.0, 1.0)
    fft: Literal["none", "logmag"] = "none"
    window: Window = "none"
    patch_norm: Literal["none", "minmax"] = "none"

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        lo, hi = self.frame_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"frame_percentiles {self.frame_percentiles} must satisfy 0 <= lo < hi <= 100")
        if self.fixed_range[0] >= self.fixed_range[1]:
            raise ValueError(f"fixed_range {self.fixed_range} must be increasing")
        if self.window != "none" and self.fft == "none":
            raise ValueError(f"window={self.window!r} only applies with fft='logmag'")
        return self


@cache
def _ranks_in_float64() -> bool:
    """Whether ``torch.quantile`` computes its ranks in float64 (torch >= 2.14) or in ``q``'s dtype (before), read
    from the installed torch's version without importing it; float64 (numpy's way too) when torch is absent.

    The frame percentiles below reproduce ``torch.quantile`` of the installed torch bit for bit (``pyproject`` admits
    torch >= 2.3 for training), so a model serves on the values it was trained on; the tests check the rule against
    torch itself. A torch-free serving install rounds as torch >= 2.14 does: against a model trained with an older
    torch, a frame's ``lo``/``hi`` can then differ in the last bit of float32.
    """
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return True
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2])
    return (major, minor) >= (2, 14)


def _ranks(q: tuple[float, ...], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``torch.quantile``'s linear interpolation of ``n`` sorted values at float32 levels ``q``: indices below and
    above each rank, and the float32 weight of the one above (ranks in float64 or float32: ``_ranks_in_float64``)."""
    levels = np.asarray(q, dtype=np.float32)
    ranks = levels.astype(np.float64) * (n - 1) if _ranks_in_float64() else levels * np.float32(n - 1)
    below = np.floor(ranks)
    return below.astype(np.int64), np.ceil(ranks).astype(np.int64), (ranks - below).astype(np.float32)


def _lerp(start: np.ndarray, end: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``torch.lerp`` of float32 values, rounded as torch rounds: its two formulas (each exact at its own end of the
    interval), each a fused multiply-add — emulated in float64, where the float32 product is exact (a plain float32
    multiply-then-add differed from torch in 1 of 10 random cases; this in none of 200 000)."""
    diff = (end - start).astype(np.float64)
    small = weight.astype(np.float64) * diff + start
    large = end - diff * (np.float32(1) - weight)
    return np.where(np.abs(weight) < 0.5, small, large).astype(np.float32)


def _quantiles(x: Array, q: tuple[float, ...]) -> Array:
    """``torch.quantile(x, q)`` of a 1-D float32 array or tensor, by selection rather than a sort; the same values.

    ``torch.quantile`` sorts all of ``x``: on a 1024² frame's sample that was the most expensive step of the whole
    frame normalisation. Only the order statistics around each rank are picked — one ``np.partition`` on the host
    (on the calling thread alone, see ``prepare_frame``), ``topk`` from the nearer end on a device — then
    interpolated as ``torch.quantile`` does. NaN (or nothing) gives NaN quantiles, as ``torch.quantile`` does.
    """
    n = math.prod(x.shape)
    below, above, weight = _ranks(q, n)
    if is_tensor(x):
        return _quantiles_torch(x, below, above, weight)
    if n == 0 or np.isnan(x).any():
        return np.full(len(q), np.nan, np.float32)
    wanted = sorted({*below.tolist(), *above.tolist()})
    picked = dict(zip(wanted, np.partition(x, wanted)[wanted], strict=True))
    values_below = np.array([picked[i] for i in below.tolist()], np.float32)
    values_above = np.array([picked[i] for i in above.tolist()], np.float32)
    return _lerp(values_below, values_above, weight)


def _quantiles_torch(x: Array, below: np.ndarray, above: np.ndarray, weight: np.ndarray) -> Array:
    """``_quantiles`` of a tensor on its device: ``topk`` from the nearer end of each wanted position."""
    torch = sys.modules["torch"]
    n = x.numel()
    if n == 0 or bool(torch.isnan(x).any()):
        return torch.full(weight.shape, float("nan"), device=x.device)
    wanted = sorted({*below.tolist(), *above.tolist()})
    low = [i for i in wanted if i < n - 1 - i]
    high = [i for i in wanted if i >= n - 1 - i]
    value: dict[int, Array] = {}
    if low:
        ascending = torch.topk(x, low[-1] + 1, largest=False, sorted=True).values
        value.update({i: ascending[i] for i in low})
    if high:
        descending = torch.topk(x, n - high[0], largest=True, sorted=True).values
        value.update({i: descending[n - 1 - i] for i in high})
    values_below = torch.stack([value[i] for i in below.tolist()])
    values_above = torch.stack([value[i] for i in above.tolist()])
    return torch.lerp(values_below, values_above, torch.from_numpy(weight).to(x.device))


def _frame_range(x: Array, spec: Preprocessing) -> tuple[float, float]:
    """``(lo, hi)`` that map to 0 and 1: the fixed range, or the frame's percentiles on a subsample (float32)."""
    if spec.frame_norm == "fixed":
        return spec.fixed_range
    sub = x[::_PERCENTILE_SUBSAMPLE, ::_PERCENTILE_SUBSAMPLE]
    sample = sub.reshape(-1) if is_tensor(sub) else np.array(sub, dtype=np.float32).reshape(-1)
    lo, hi = _quantiles(sample, tuple(p / 100.0 for p in spec.frame_percentiles))
    return float(lo), float(hi)


#: Tensor dtypes the host path hands to numpy (numpy has no bfloat16, for one).
_HOST_DTYPES = frozenset({"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8"})


def prepare_frame(frame: Array, spec: Preprocessing) -> Array:
    """Frame-level normalisation to float32, of the frame's kind and on its device (a numpy frame may be a read-only
    view: it is only read). A new array, except ``frame_norm="none"`` on a float32 tensor (itself).

    On the host the arithmetic runs in numpy, on the calling thread alone: the service normalises frames while its
    encoder keeps every core busy with threads of its own, and torch's intra-op threads then wait for a core at every
    operation (measured on 2 shared cores: a 1024² frame took 10–46 ms on torch's threads, 1.7 ms in numpy). Both
    paths do the same float32 operations in the same order — ``(x - lo) * scale``, clamped to [0, 1], ``lo``/``hi``
    the frame's percentiles interpolated as ``torch.quantile`` does — so training and serving see the same values
    whichever ran (tests compare the two).
    """
    if not is_tensor(frame):
        return _normalise_host(np.asarray(frame), spec)
    host_dtype = dtype_name(frame) in _HOST_DTYPES
    if not on_gpu(frame) and host_dtype and spec.frame_norm != "none":
        return sys.modules["torch"].from_numpy(_normalise_host(frame.detach().numpy(), spec))
    return _normalise(frame, spec)


def _normalise(frame: Array, spec: Preprocessing) -> Array:
    """``prepare_frame`` in torch (any device)."""
    x = astype(frame, "float32")
    if spec.frame_norm == "none":
        return x
    lo, hi = _frame_range(x, spec)
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    # one new tensor, then in place: the same float32 arithmetic as ((x - lo) * scale).clamp(0, 1)
    return sys.modules["torch"].sub(x, lo).mul_(scale).clamp_(0.0, 1.0)


def _normalise_host(frame: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """``prepare_frame`` in numpy: a new float32 array (torch rounds the Python scalars to float32 too)."""
    x = frame.astype(np.float32, copy=False)
    if spec.frame_norm == "none":
        return frame.astype(np.float32)
    lo, hi = _frame_range(x, spec)
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out = np.subtract(x, np.float32(lo), dtype=np.float32)
    np.multiply(out, np.float32(scale), out=out)
    return np.clip(out, np.float32(0.0), np.float32(1.0), out=out)


def _is_contiguous(x: Array) -> bool:
    return bool(x.is_contiguous()) if is_tensor(x) else bool(x.flags.c_contiguous)


def _view(x: Array, shape: tuple[int, ...]) -> Array:
    """A view of contiguous ``x`` with ``shape`` (never a copy: writes through it must land in ``x``)."""
    if is_tensor(x):
        return x.view(shape)
    if not x.flags.c_contiguous:
        raise ValueError(f"a view of shape {shape} needs a contiguous array, got strides {x.strides}")
    # a C-contiguous array always reshapes to a view; setting .shape instead is deprecated from numpy 2.5 (on the
    # GPU machine's numpy 2.5.2 it failed the suite's warnings-as-errors wherever patches were cut into a buffer)
    return x.reshape(shape)


def _minmax(x: Array, out: Array | None) -> Array:
    """Each patch of ``(N, ph, pw)`` rescaled to [0, 1] (a constant patch to 0), into ``out`` when given."""
    lo = amin(x, (-2, -1), keepdims=True)
    span = amax(x, (-2, -1), keepdims=True) - lo
    if is_tensor(x):
        torch = sys.modules["torch"]
        scaled = torch.sub(x, lo, out=out)
        return scaled.div_(torch.where(span > 0, span, torch.ones_like(span)))
    scaled = np.subtract(x, lo, out=out)
    return np.divide(scaled, np.where(span > 0, span, np.float32(1)), out=scaled)


def prepare_patches(patches: Array, spec: Preprocessing, *, out: Array | None = None) -> Array:
    """Patch-level steps on ``(..., ph, pw)``: returns ``(N, 1, ph, pw)`` float32, contiguous.

    ``out`` (``(N, 1, ph, pw)`` float32, contiguous, of the patches' kind and device): write the result there and
    return it. The service passes a slice of its encoder batch buffer, so cutting the patches out of the frame
    (``patches`` is usually a strided ``tile_grid`` view), the patch transforms and the batching are one pass into
    memory that is reused from batch to batch, with the same values as without ``out``.
    """
    ph, pw = int(patches.shape[-2]), int(patches.shape[-1])
    if out is not None:
        n = math.prod(patches.shape) // (ph * pw) if ph * pw else 0
        if tuple(out.shape) != (n, 1, ph, pw) or dtype_name(out) != "float32":
            raise ValueError(
                f"out must be a contiguous float32 array of shape {(n, 1, ph, pw)}, got {tuple(out.shape)} {out.dtype}"
            )
        if is_tensor(out) != is_tensor(patches):
            raise ValueError(
                f"out is a {type(out).__name__} but the patches are a {type(patches).__name__}; "
                "give out of the same kind (the pipeline's batch_buffer() is)"
            )
        if not _is_contiguous(out):
            raise ValueError(f"out must be a contiguous float32 array of shape {(n, 1, ph, pw)}; it is not contiguous")
    if spec.fft == "none" and spec.patch_norm == "none":
        if out is None:
            flat = astype(patches.reshape(-1, 1, ph, pw), "float32")
            return flat.contiguous() if is_tensor(flat) else np.ascontiguousarray(flat)
        copy_into(_view(out, tuple(patches.shape)), patches)  # the strided cut and the float32 conversion in one copy
        return out
    x = astype(patches.reshape(-1, ph, pw), "float32")
    if spec.fft == "logmag":
        x = log_magnitude(x, spec.window)
    if spec.patch_norm == "minmax":
        x = _minmax(x, _view(out, (-1, ph, pw)) if out is not None else None)
        if out is not None:
            return out
    if out is None:
        x = x.reshape(-1, 1, ph, pw)
        return x.contiguous() if is_tensor(x) else np.ascontiguousarray(x)
    copy_into(_view(out, (-1, ph, pw)), x)
    return out


def grid_patches(
    frame: Array,
    spec: Preprocessing,
    patch: tuple[int, int],
    stride: tuple[int, int],
    origin: tuple[int, int] = (0, 0),
) -> tuple[Array, tuple[int, int]]:
    """A raw frame to encoder input on a grid: ``(patches (gh*gw, 1, ph, pw), (gh, gw))``, row-major."""
    tiles = tile_grid(prepare_frame(frame, spec), patch, stride, origin)
    return prepare_patches(tiles, spec), (tiles.shape[0], tiles.shape[1])


def point_patches(frame: Array, spec: Preprocessing, centers: Array, patch: tuple[int, int]) -> tuple[Array, Array]:
    """A raw frame to encoder input at points: ``(patches (M, 1, ph, pw), kept centres (M, 2))``."""
    tiles, kept = gather_points(prepare_frame(frame, spec), centers, patch)
    return prepare_patches(tiles, spec), asarray_like(centers, frame)[kept]
