"""The decoder's redrawing that the defect score reads: the model's own likelihood, averaged over q(y)."""

from __future__ import annotations

import math

import pytest
import torch

from exporters.wrapper import redraw_of
from models.config import ModelConfig
from models.jtrvae import JTrVAE


@pytest.mark.parametrize(
    ("n_classes", "rotation", "translation", "likelihood"),
    [(3, True, True, "bernoulli"), (0, True, False, "gaussian"), (2, False, False, "bernoulli")],
)
def test_redraw_is_the_posterior_average_of_the_models_own_likelihood(
    n_classes: int, rotation: bool, translation: bool, likelihood: str
) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch=(10, 12), n_classes=n_classes, latent_dim=2, rotation=rotation, translation=translation,
        encoder_hidden=(16,), decoder_hidden=(16, 16), likelihood=likelihood,
    )  # fmt: skip
    model = JTrVAE(cfg).eval()
    x = torch.rand(5, 1, 10, 12)
    out = redraw_of(model)(model.encoder(model._flat(x)), x)
    # independently: each class's pixel means from JTrVAE.generate, scored by hand, weighted by q(y|x)
    enc = model.encode(x)
    classes = range(n_classes) if n_classes else [None]
    nll, mean = torch.zeros(5), torch.zeros(5, 120)
    for k in classes:
        y = None if k is None else torch.full((5,), k)
        m = model.generate(enc["z"], y, enc.get("angle"), enc.get("shift")).reshape(5, -1)
        xf = x.reshape(5, -1)
        if likelihood == "bernoulli":
            term = -(xf * m.log() + (1 - xf) * (1 - m).log()).sum(-1)
        else:
            s = cfg.gaussian_scale
            term = (0.5 * ((xf - m) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).sum(-1)
        w = torch.ones(5) if k is None else enc["class_prob"][:, k]
        nll, mean = nll + w * term, mean + w[:, None] * m
    assert torch.allclose(out["recon_nll"], nll, rtol=1e-4, atol=1e-3)
    assert torch.allclose(out["recon_residual"], x.reshape(5, -1) - mean, atol=1e-5)
    assert out["recon_nll"].shape == (5,) and out["recon_residual"].shape == (5, 120)
