"""Pixel-coordinate grids and their rigid transforms, the input of the coordinate decoders.

The decoder draws an image by evaluating a function at every pixel's coordinate, so rotating or shifting the image
is the same as rotating or shifting the grid. That is how the invariant VAEs keep rotation and translation out of
the network weights.

Conventions, shared by training, generation and the exported ``angle``/``shift`` outputs:

* a grid row is ``(x, y)``: ``x`` runs along the columns (left to right), ``y`` along the rows (top to bottom);
* rows of the grid are the pixels in row-major order (pixel ``(i, j)`` of an ``ph×pw`` patch is row ``i*pw + j``),
  so a decoder output of length ``ph*pw`` reshapes straight to ``(ph, pw)``;
* coordinates are centred on the patch centre and divided by half the *longer* side minus one half-pixel, so the
  longer side spans exactly [-1, 1] and both axes share one unit (a rotation stays a rotation on non-square patches);
* ``R(γ) = [[cos γ, -sin γ], [sin γ, cos γ]]`` acts on ``(x, y)`` and the shift is added after it:
  ``X' = R(γ)·X + s``, with ``s = (s_x, s_y)`` in the same unit (1 = half the longer side).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["direction", "pixel_grid", "rotate_shift_grid", "transform_grid"]


def pixel_grid(
    ph: int, pw: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """The ``(ph*pw, 2)`` grid of centred ``(x, y)`` pixel coordinates (see the module docstring)."""
    half = (max(ph, pw) - 1) / 2.0
    if half <= 0:
        raise ValueError(f"patch ({ph}, {pw}) has no extent; give each side at least 2 pixels")
    ys = (torch.arange(ph, device=device, dtype=dtype) - (ph - 1) / 2.0) / half
    xs = (torch.arange(pw, device=device, dtype=dtype) - (pw - 1) / 2.0) / half
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def direction(angle: Tensor) -> Tensor:
    """Unit vectors ``(cos γ, sin γ)`` of angles in radians, shape ``(..., 2)``."""
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def rotate_shift_grid(grid: Tensor, unit: Tensor | None, shift: Tensor | None) -> Tensor:
    """``R·X + s`` where the rotation is given by its unit vector ``(cos γ, sin γ)``, shape ``(..., B, 2)``.

    The projected-normal angle latent *is* such a unit vector, so the model rotates with it directly and never
    goes through ``atan2`` (whose gradient is singular at the origin). ``shift`` has shape ``(..., B, 2)``.
    Returns ``(..., B, P, 2)``; with neither transform, ``(1, P, 2)`` (the grid, broadcastable over any batch).
    """
    out = grid.unsqueeze(0)
    if unit is not None:
        c, s = unit[..., 0, None], unit[..., 1, None]  # (..., B, 1)
        x, y = grid[:, 0], grid[:, 1]  # (P,)
        out = torch.stack([c * x - s * y, s * x + c * y], dim=-1)  # (..., B, P, 2)
    if shift is not None:
        out = out + shift.unsqueeze(-2)
    return out


def transform_grid(grid: Tensor, angle: Tensor | None, shift: Tensor | None) -> Tensor:
    """``R(γ)·X + s`` for angles in radians ``(..., B)`` and shifts ``(..., B, 2)``; returns ``(..., B, P, 2)``."""
    return rotate_shift_grid(grid, None if angle is None else direction(angle), shift)
