"""The decoder's redrawing that the defect score reads: the model's own likelihood at the posterior means."""

from __future__ import annotations

import math

import pytest
import torch

from exporters.wrapper import redraw_of
from models.config import ModelConfig
from models.coords import direction, rotate_shift_grid
from models.jtrvae import JTrVAE
from models.reconstruction import redraw_blocks, redraw_step, redrawn_values


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


def test_a_large_patch_is_redrawn_on_block_means_against_the_decoder_at_the_block_centres() -> None:
    """The cost stays ~REDRAW_PIXELS values a patch at any size, and every pixel still counts (a block mean)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch=(33, 32), n_classes=2, latent_dim=2, rotation=True, translation=True, encoder_hidden=(16,),
        decoder_hidden=(16, 16),
    )  # fmt: skip
    model = JTrVAE(cfg).eval()
    redraw = redraw_of(model)
    step = redraw.step
    assert step == redraw_step((33, 32)) > 1  # a 33x32 patch is larger than REDRAW_PIXELS
    bh, bw = 33 // step, 32 // step
    assert redraw.pixels == bh * bw == redrawn_values((33, 32))  # what the manifest records
    blocks = redraw_blocks((33, 32), step)
    assert torch.allclose(blocks.sum(0), torch.ones(bh * bw, dtype=torch.float64))  # each column a block's mean
    assert int((blocks > 0).sum()) == bh * bw * step * step  # leftover edge rows dropped, every other pixel used once
    r0, c0 = (33 - bh * step) // 2, (32 - bw * step) // 2
    x = torch.rand(4, 1, 33, 32)
    x[:, :, r0 + 2 * step : r0 + 3 * step, c0 + 5 * step : c0 + 6 * step] = 0.0  # a dark spot filling block (2, 5)
    with torch.no_grad():
        heads = model.encoder(model._flat(x))
        out = redraw(heads, x)
        enc = model.encode(x)
        coords = rotate_shift_grid((blocks.t() @ model.grid.double()).float(), direction(enc["angle"]), enc["shift"])
        want = torch.sigmoid(model.decoder(coords, enc["z"], enc["class_prob"]))
    means = x.reshape(4, -1).double() @ blocks
    assert out["recon_residual"].shape == (4, bh * bw)
    assert torch.allclose(out["recon_residual"], means.float() - want, atol=1e-5)
    assert torch.allclose(means[:, 2 * bw + 5], torch.zeros(4, dtype=torch.float64))
    bce = -(means * want.double().log() + (1 - means) * (1 - want.double()).log()).sum(-1)
    assert torch.allclose(out["recon_nll"].double(), step * step * bce, rtol=1e-4)


@pytest.mark.parametrize("decoder", ["dense", "spatial_broadcast"])
def test_a_decoder_that_draws_the_whole_grid_is_redrawn_whole_and_averaged_over_the_blocks(decoder: str) -> None:
    """Dense and broadcast decoders cannot be evaluated at the block centres alone (a 32-px dense model once failed
    its export: "this decoder draws 1024 pixels, the grid has 64"); their full drawing is averaged instead."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        patch=(32, 32), n_classes=2, latent_dim=2, rotation=False, translation=False, encoder_hidden=(16,),
        decoder_hidden=(16, 16), decoder=decoder,
    )  # fmt: skip
    model = JTrVAE(cfg).eval()
    redraw = redraw_of(model)
    assert redraw.step > 1
    assert redraw.pixels == redrawn_values((32, 32))  # what the manifest records
    blocks = redraw_blocks((32, 32), redraw.step)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        out = redraw(model.encoder(model._flat(x)), x)
        enc = model.encode(x)
        want = torch.sigmoid(model.decoder(model.grid, enc["z"], enc["class_prob"])).double() @ blocks
    means = x.reshape(3, -1).double() @ blocks
    assert out["recon_residual"].shape == (3, redrawn_values((32, 32)))
    assert torch.allclose(out["recon_residual"].double(), means - want, atol=1e-5)
