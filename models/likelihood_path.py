"""Which implementation computes the coordinate decoder's likelihood on a given device: the fused kernel or autograd.

``models.fused_likelihood`` is tuned for a CPU: memory bandwidth is what a step waits on there, so it keeps every
activation in cache-sized chunks run one after another, writes tanh as ``2σ(2a) − 1`` because ATen's CPU sigmoid is
faster, and computes per-(class, image) gradients in the forward. On a GPU each of those choices turns against it:
bandwidth is tens of times higher and the caching allocator makes big activations cheap, a loop of small chunks
serialises kernel launches that one large matmul would fill the device with, and tanh costs what sigmoid does. So
on CUDA (and any other accelerator) the decoder runs through plain autograd: one ``K·B·P × H`` matmul per layer,
whose activations at the paper's size (4 classes × 32 images × 48² pixels × 256 float32 ≈ 300 MB a tensor) fit a
GPU easily. ``torch.compile`` could fuse the elementwise tail as well; it is not the default because no GPU has run
it here and its first call compiles for tens of seconds. ``benchmarks/gpu_check.sh`` measures both paths.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["LikelihoodPath", "likelihood_path"]

LikelihoodPath = Literal["fused", "autograd"]


def likelihood_path(device: torch.device | str) -> LikelihoodPath:
    """``"fused"`` (``models.fused_likelihood``) on the CPU, ``"autograd"`` on every other device type."""
    return "fused" if torch.device(device).type == "cpu" else "autograd"
