"""Which likelihood the coordinate decoder runs on which device: the CPU-tuned fused kernel on the CPU only, plain
autograd everywhere else (``models.likelihood_path``). Checked without a GPU: the choice reads the device type."""

from __future__ import annotations

import pytest
import torch

from models.likelihood_path import likelihood_path
from models.nets import CoordDecoder


@pytest.mark.parametrize(("device", "path"), [("cpu", "fused"), ("cuda", "autograd"), ("cuda:1", "autograd"),
                                              (torch.device("cuda", 0), "autograd"), ("meta", "autograd")])  # fmt: skip
def test_the_fused_kernel_is_chosen_on_the_cpu_only(device: str | torch.device, path: str) -> None:
    # the choice reads the device type alone, so it is checked here without a GPU
    assert likelihood_path(device) == path


def _backward_names(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize(("device", "fused"), [("cpu", True), ("meta", False)])
def test_the_decoder_likelihood_takes_the_path_its_device_selects(device: str, fused: bool) -> None:
    # "meta" tensors (shapes, no data) stand in for a GPU's: any device but the CPU must take the autograd branch
    dec = CoordDecoder(latent_dim=2, n_classes=3, hidden=(8, 8)).to(device)
    coords, z = torch.zeros(5, 16, 2, device=device), torch.zeros(5, 2, device=device)
    y = torch.eye(3, device=device).reshape(3, 1, 3)
    x = torch.zeros(5, 16, device=device)
    out = dec.log_likelihood(coords, z, y, x, likelihood="bernoulli", gaussian_scale=0.1)
    assert out.shape == (3, 5)
    assert ("_FusedCoordMLPBackward" in _backward_names(out)) == fused
