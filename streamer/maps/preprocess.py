"""The one preprocessing path shared by training and serving.

``models.data`` builds training patches with these functions and the exporter writes the ``Preprocessing`` it used
into the artifact's manifest; ``streamer.maps.pipeline`` reads it back and calls the same functions on live frames. So a
change here changes both halves together, which is the point.

Order: frame normalisation → cut patches (grid or points) → optional FFT (log magnitude) → optional per-patch
min-max. The result is float32, shape ``(N, 1, ph, pw)``, values in [0, 1] when any normalisation is on (the
Bernoulli likelihood of the model needs that range).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

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


def _quantile_ranks_in_float64() -> bool:
    """Whether this torch's ``quantile`` computes its ranks in float64 (torch >= 2.14) or in ``q``'s dtype (before).

    Asked of torch itself, once, on a case where the two differ, so the frame path matches the installed version
    bit for bit whichever it is (``pyproject`` admits torch >= 2.3).
    """
    x = (torch.arange(64, dtype=torch.float64) * 0.7548776662466927).frac().float().sort().values
    q = torch.tensor([0.01, 0.99])  # on these 64 values the two ways round differently
    ranks = q.to(torch.float64) * 63
    below = ranks.floor()
    as64 = torch.lerp(x[below.long()], x[ranks.ceil().long()], (ranks - below).to(torch.float32))
    return bool(torch.equal(torch.quantile(x, q), as64))


_RANKS_IN_FLOAT64 = _quantile_ranks_in_float64()


def _ranks(q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.quantile``'s linear interpolation of ``n`` sorted values: indices below and above each rank, and the
    weight of the one above — the same arithmetic as the installed torch (ranks in float64 from 2.14 on, in ``q``'s
    dtype before), so the same quantiles."""
    ranks = q.to(torch.float64) * (n - 1) if _RANKS_IN_FLOAT64 else q * (n - 1)
    below = ranks.floor()
    return below.to(torch.long), ranks.ceil().to(torch.long), (ranks - below).to(q.dtype)


def _order_statistics(x: torch.Tensor | np.ndarray, wanted: list[int]) -> dict[int, torch.Tensor]:
    """The values at sorted (ascending) positions ``wanted`` of a 1-D ``x``, picked by selection, not a full sort.

    numpy: one ``np.partition`` (on the calling thread alone, see ``prepare_frame``). torch (any device): ``topk``
    from the nearer end of each position.
    """
    if isinstance(x, np.ndarray):
        picked = torch.from_numpy(np.partition(x, wanted)[wanted])
        return dict(zip(wanted, picked, strict=True))
    n = x.numel()
    low = [i for i in wanted if i < n - 1 - i]
    high = [i for i in wanted if i >= n - 1 - i]
    value: dict[int, torch.Tensor] = {}
    if low:
        ascending = torch.topk(x, low[-1] + 1, largest=False, sorted=True).values
        value.update({i: ascending[i] for i in low})
    if high:
        descending = torch.topk(x, n - high[0], largest=True, sorted=True).values
        value.update({i: descending[n - 1 - i] for i in high})
    return value


def _quantiles(x: torch.Tensor | np.ndarray, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(x, q)`` of a 1-D float32 tensor or numpy array, by selection; the same values.

    ``torch.quantile`` sorts all of ``x``: on a 1024² frame's sample that was the most expensive step of the whole
    frame normalisation. Only the order statistics around each rank are picked (``_order_statistics``), then
    interpolated as ``torch.quantile`` does, in this one place for both the numpy and the torch frame path — which
    is what keeps the two bit-identical. NaN keeps ``torch.quantile``'s meaning (every quantile NaN) by deferring to
    it.
    """
    n = x.size if isinstance(x, np.ndarray) else x.numel()
    has_nan = bool(np.isnan(x).any()) if isinstance(x, np.ndarray) else bool(torch.isnan(x).any())
    if n == 0 or has_nan:
        return torch.quantile(torch.as_tensor(x), q)
    below, above, weights = _ranks(q, n)
    value = _order_statistics(x, sorted({int(i) for i in torch.cat([below, above]).tolist()}))
    values_below = torch.stack([value[int(i)] for i in below.tolist()])
    values_above = torch.stack([value[int(i)] for i in above.tolist()])
    return torch.lerp(values_below, values_above, weights)


def _frame_range(x: torch.Tensor | np.ndarray, spec: Preprocessing) -> tuple[float, float]:
    """``(lo, hi)`` that map to 0 and 1: the fixed range, or the frame's percentiles on a subsample (float32)."""
    if spec.frame_norm == "fixed":
        return spec.fixed_range
    sub = x[::_PERCENTILE_SUBSAMPLE, ::_PERCENTILE_SUBSAMPLE]
    device = None if isinstance(x, np.ndarray) else x.device
    sample = np.array(sub, dtype=np.float32).reshape(-1) if device is None else sub.reshape(-1)
    q = torch.tensor([p / 100.0 for p in spec.frame_percentiles], device=device, dtype=torch.float32)
    lo, hi = _quantiles(sample, q)
    return float(lo), float(hi)


#: Tensor dtypes the CPU path hands to numpy (numpy has no bfloat16, for one).
_HOST_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
)


def prepare_frame(frame: torch.Tensor | np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """Frame-level normalisation to float32, on the frame's device (a numpy frame is a CPU frame, and may be a
    read-only view: it is only read). A new tensor, except ``frame_norm="none"`` on a float32 tensor (itself).

    On the CPU the arithmetic runs in numpy, on the calling thread alone: the service normalises frames while its
    encoder keeps every core busy with threads of its own, and torch's intra-op threads then wait for a core at every
    operation (measured on 2 shared cores: a 1024² frame took 10–46 ms on torch's threads, 1.7 ms in numpy). Both
    paths do the same float32 operations in the same order — ``(x - lo) * scale``, clamped to [0, 1], ``lo``/``hi``
    the frame's percentiles interpolated as ``torch.quantile`` does — so training and serving see the same values
    whichever ran (tests compare the two).
    """
    if isinstance(frame, np.ndarray):
        return torch.from_numpy(_normalise_host(frame, spec))
    if frame.device.type == "cpu" and frame.dtype in _HOST_DTYPES and spec.frame_norm != "none":
        return torch.from_numpy(_normalise_host(frame.detach().numpy(), spec))
    return _normalise(frame, spec)


def _normalise(frame: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """``prepare_frame`` in torch (any device)."""
    x = frame.to(torch.float32)
    if spec.frame_norm == "none":
        return x
    lo, hi = _frame_range(x, spec)
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    # one new tensor, then in place: the same float32 arithmetic as ((x - lo) * scale).clamp(0, 1)
    return torch.sub(x, lo).mul_(scale).clamp_(0.0, 1.0)


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


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src`` — on the CPU on the calling thread alone (numpy), not on torch's intra-op threads.

    The service writes patches into its encoder batch buffer while the encoder runs on every core with its own
    threads; a second parallel runtime on the same cores makes both wait at their barriers for a thread the other
    one preempted. Measured on 2 cores, cutting a 1024² frame's 64 MB of patches: one thread 4.3 ms of CPU, two
    torch threads 5.6–6.8 ms of CPU (faster only on an otherwise idle machine; 8 ms instead of 4.6 ms when another
    process was busy). A copy is a copy: the values are the same either way.
    """
    if dst.device.type == "cpu" and src.device.type == "cpu" and src.dtype == dst.dtype:
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)


def prepare_patches(patches: torch.Tensor, spec: Preprocessing, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-level steps on ``(..., ph, pw)``: returns ``(N, 1, ph, pw)`` float32, contiguous.

    ``out`` (``(N, 1, ph, pw)`` float32, contiguous, on the patches' device): write the result there and return it.
    The service passes a slice of its encoder batch buffer, so cutting the patches out of the frame (``patches`` is
    usually a strided ``tile_grid`` view), the patch transforms and the batching are one pass into memory that is
    reused from batch to batch, with the same values as without ``out``.
    """
    ph, pw = patches.shape[-2], patches.shape[-1]
    if out is not None:
        n = patches.numel() // (ph * pw) if ph * pw else 0
        if tuple(out.shape) != (n, 1, ph, pw) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous float32 tensor of shape {(n, 1, ph, pw)}, got {tuple(out.shape)} {out.dtype}"
            )
    if spec.fft == "none" and spec.patch_norm == "none":
        if out is None:
            return patches.reshape(-1, ph, pw).to(torch.float32).unsqueeze(1).contiguous()
        _copy(out.view(patches.shape), patches)  # the strided cut and the float32 conversion in one copy
        return out
    x = patches.reshape(-1, ph, pw).to(torch.float32)
    if spec.fft == "logmag":
        x = log_magnitude(x, spec.window)
    if spec.patch_norm == "minmax":
        lo = x.amin(dim=(-2, -1), keepdim=True)
        span = x.amax(dim=(-2, -1), keepdim=True) - lo
        scaled = torch.sub(x, lo, out=out.view(-1, ph, pw) if out is not None else None)
        x = scaled.div_(torch.where(span > 0, span, torch.ones_like(span)))
        if out is not None:
            return out
    if out is None:
        return x.unsqueeze(1).contiguous()
    out.view(-1, ph, pw).copy_(x)
    return out


def grid_patches(
    frame: torch.Tensor,
    spec: Preprocessing,
    patch: tuple[int, int],
    stride: tuple[int, int],
    origin: tuple[int, int] = (0, 0),
) -> tuple[torch.Tensor, tuple[int, int]]:
    """A raw frame to encoder input on a grid: ``(patches (gh*gw, 1, ph, pw), (gh, gw))``, row-major."""
    tiles = tile_grid(prepare_frame(frame, spec), patch, stride, origin)
    return prepare_patches(tiles, spec), (tiles.shape[0], tiles.shape[1])


def point_patches(
    frame: torch.Tensor, spec: Preprocessing, centers: torch.Tensor, patch: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A raw frame to encoder input at points: ``(patches (M, 1, ph, pw), kept centres (M, 2))``."""
    tiles, kept = gather_points(prepare_frame(frame, spec), centers, patch)
    return prepare_patches(tiles, spec), centers.to(frame.device)[kept]
