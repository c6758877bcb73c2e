"""Per-patch spectra: the centred log-magnitude of the 2-D FFT.

Why the FFT at all: for lattice images (STM of graphene, the paper's fourth case) a patch's spectrum does not depend
on where the patch sits relative to the lattice, so the encoder sees the local order (lattice, defect, interference)
instead of the phase of the lattice. ``log1p`` tames the dynamic range of the Bragg peaks against the background.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["Window", "log_magnitude", "window_2d"]

Window = Literal["none", "hann"]


def window_2d(ph: int, pw: int, kind: Window, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """A separable window (``None`` for ``"none"``): a Hann window suppresses the edge streaks of the FFT."""
    if kind == "none":
        return None
    if kind == "hann":
        wy = torch.hann_window(ph, periodic=False, device=device, dtype=dtype)
        wx = torch.hann_window(pw, periodic=False, device=device, dtype=dtype)
        return wy[:, None] * wx[None, :]
    raise ValueError(f"unknown window {kind!r}; use 'none' or 'hann'")


def log_magnitude(patches: torch.Tensor, window: Window = "none") -> torch.Tensor:
    """``log(1 + |FFT2(patch)|)`` with the zero frequency in the centre, over the last two dimensions.

    The patch mean is removed first so the DC term does not dominate the normalised spectrum.
    """
    x = patches.to(torch.float32) if not patches.is_floating_point() else patches
    if x.numel() == 0:  # a frame with no patch in bounds: MKL's FFT refuses an empty batch
        return torch.zeros_like(x)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    w = window_2d(x.shape[-2], x.shape[-1], window, device=x.device, dtype=x.dtype)
    if w is not None:
        x = x * w
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    return torch.log1p(spectrum.abs())
