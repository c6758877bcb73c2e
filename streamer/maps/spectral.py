"""Per-patch spectra: the centred log-magnitude of the 2-D FFT.

Why the FFT at all: for lattice images (STM of graphene, the paper's fourth case) a patch's spectrum does not depend
on where the patch sits relative to the lattice, so the encoder sees the local order (lattice, defect, interference)
instead of the phase of the lattice. ``log1p`` tames the dynamic range of the Bragg peaks against the background.
"""

from __future__ import annotations

import math
import sys
from typing import Literal

import numpy as np

from streamer.maps.arrays import Array, asarray_like, astype, dtype_name, is_floating, is_tensor, log1p, zeros

__all__ = ["Window", "log_magnitude", "window_2d"]

Window = Literal["none", "hann"]


def window_2d(ph: int, pw: int, kind: Window, *, like: Array) -> Array | None:
    """A separable window (``None`` for ``"none"``) in ``like``'s kind, dtype and device: a Hann window suppresses
    the edge streaks of the FFT. Computed once, in float64 by numpy, for both kinds (then rounded to the dtype)."""
    if kind == "none":
        return None
    if kind == "hann":
        w = np.hanning(ph)[:, None] * np.hanning(pw)[None, :]
        return asarray_like(w.astype(dtype_name(like)), like)
    raise ValueError(f"unknown window {kind!r}; use 'none' or 'hann'")


def log_magnitude(patches: Array, window: Window = "none") -> Array:
    """``log(1 + |FFT2(patch)|)`` with the zero frequency in the centre, over the last two dimensions.

    The patch mean is removed first so the DC term does not dominate the normalised spectrum. numpy in, numpy out
    (float32: numpy's FFT keeps float32 as complex64); a tensor in, a tensor out on its device (torch's FFT).
    """
    x = patches if is_floating(patches) else astype(patches, "float32")
    if math.prod(x.shape) == 0:  # a frame with no patch in bounds: MKL's FFT refuses an empty batch
        return zeros(tuple(x.shape), dtype_name(x), like=x)
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    w = window_2d(x.shape[-2], x.shape[-1], window, like=x)
    if w is not None:
        x = x * w
    fft = sys.modules["torch"].fft if is_tensor(x) else np.fft
    spectrum = fft.fftshift(fft.fft2(x), (-2, -1))
    return astype(log1p(abs(spectrum)), dtype_name(x))
