"""The decoder's redrawing that the defect score reads: the model's own likelihood at the posterior means."""

from __future__ import annotations

import math

import pytest
import torch

from exporters.wrapper import redraw_of
from models.config import ModelConfig
from models.jtrvae import JTrVAE


def _model(n_classes: int, rotation: bool, translation: bool, likelihood: str) -> JTrVAE:
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch=(10, 12), n_classes=n_classes, latent_dim=2, rotation=rotation, translation=translation,
        encoder_hidden=(16,), decoder_hidden=(16, 16), likelihood=likelihood,
    )  # fmt: skip
    return JTrVAE(cfg).eval()


@pytest.mark.parametrize(
    ("n_classes", "rotation", "translation", "likelihood"),
    [(3, True, True, "bernoulli"), (0, True, False, "gaussian"), (2, False, False, "bernoulli")],
)
def test_a_confident_patch_is_redrawn_as_its_class_and_scored_by_the_models_own_likelihood(
    n_classes: int, rotation: bool, translation: bool, likelihood: str
) -> None:
    model = _model(n_classes, rotation, translation, likelihood)
    if n_classes:  # make q(y|x) one-hot: the redrawing must then be JTrVAE.generate of the argmax class
        last = model.encoder.class_head.net[-1]
        with torch.no_grad():
            last.weight.mul_(1e4)
            last.bias.mul_(1e4)
    x = torch.rand(5, 1, 10, 12)
    with torch.no_grad():
        out = redraw_of(model)(model.encoder(model._flat(x)), x)
        enc = model.encode(x)
        y = enc["class_prob"].argmax(1) if n_classes else None
        m = model.generate(enc["z"], y, enc.get("angle"), enc.get("shift")).reshape(5, -1)
    xf = x.reshape(5, -1)
    if likelihood == "bernoulli":
        want = -(xf * m.log() + (1 - xf) * (1 - m).log()).sum(-1)
    else:
        s = model.cfg.gaussian_scale
        want = (0.5 * ((xf - m) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).sum(-1)
    assert out["recon_nll"].shape == (5,) and out["recon_residual"].shape == (5, 120)
    assert torch.allclose(out["recon_nll"], want, rtol=1e-4, atol=1e-3)
    assert torch.allclose(out["recon_residual"], xf - m, atol=1e-5)


def test_the_redrawing_does_not_jump_where_two_classes_tie() -> None:
    """The reason the class enters as its probabilities: an argmax flip at a tie would jump the score."""
    model = _model(3, True, True, "bernoulli")
    x = torch.rand(1, 1, 10, 12)
    redraw = redraw_of(model)
    with torch.no_grad():
        heads = model.encoder(model._flat(x))
        nll = []
        for eps in (-1e-4, 1e-4):  # class 0 just below, then just above class 1
            h = dict(heads)
            h["class_logits"] = torch.tensor([[eps, 0.0, -5.0]])
            nll.append(float(redraw(h, x)["recon_nll"]))
        far = dict(heads)
        far["class_logits"] = torch.tensor([[5.0, 0.0, -5.0]])
        moved = abs(float(redraw(far, x)["recon_nll"]) - nll[0])
    assert moved > 0  # the class does change the redrawing ...
    assert abs(nll[1] - nll[0]) < 1e-3 * max(moved, 1e-3)  # ... but smoothly through the tie
