"""A real encoder made slower: the stand-in for a busy GPU, the one thing these tests cannot have."""

from __future__ import annotations

import time

import torch

from streamer.maps.encoder import Encoder


class SlowEncoder:
    """A real encoder that takes ``delay_s`` longer per call, as a slow or busy GPU would."""

    def __init__(self, inner: Encoder, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.manifest = inner.manifest
        self.backend, self.device = inner.backend, inner.device
        self.torch_device, self.sha256 = inner.torch_device, inner.sha256
        self.calls = 0

    def __call__(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        time.sleep(self.delay_s)  # the simulated device time, not a wait for a socket
        return self.inner(patches)
