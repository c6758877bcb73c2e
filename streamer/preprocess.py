"""The one preprocessing path shared by training and serving.

``models.data`` builds training patches with these functions and the exporter writes the ``Preprocessing`` it used
into the artifact's manifest; ``streamer.pipeline`` reads it back and calls the same functions on live frames. So a
change here changes both halves together, which is the point.

Order: frame normalisation → cut patches (grid or points) → optional FFT (log magnitude) → optional per-patch
min-max. The result is float32, shape ``(N, 1, ph, pw)``, values in [0, 1] when any normalisation is on (the
Bernoulli likelihood of the model needs that range).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from streamer.spectral import Window, log_magnitude
from streamer.tiling import gather_points, tile_grid

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


def prepare_frame(frame: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """Frame-level normalisation to float32 (on the frame's device)."""
    x = frame.to(torch.float32)
    if spec.frame_norm == "none":
        return x
    if spec.frame_norm == "fixed":
        lo, hi = spec.fixed_range
    else:
        sample = x[::_PERCENTILE_SUBSAMPLE, ::_PERCENTILE_SUBSAMPLE].reshape(-1)
        q = torch.tensor([p / 100.0 for p in spec.frame_percentiles], device=x.device, dtype=x.dtype)
        lo_t, hi_t = torch.quantile(sample, q)
        lo, hi = float(lo_t), float(hi_t)
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def prepare_patches(patches: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """Patch-level steps on ``(..., ph, pw)``: returns ``(N, 1, ph, pw)`` float32, contiguous."""
    ph, pw = patches.shape[-2], patches.shape[-1]
    x = patches.reshape(-1, ph, pw).to(torch.float32)
    if spec.fft == "logmag":
        x = log_magnitude(x, spec.window)
    if spec.patch_norm == "minmax":
        lo = x.amin(dim=(-2, -1), keepdim=True)
        span = x.amax(dim=(-2, -1), keepdim=True) - lo
        x = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return x.unsqueeze(1).contiguous()


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
