"""The Pyro model and guide: the sample sites of all six variants, exact parallel enumeration of the class, the
von Mises prior's normalisation, and the inference-time helpers."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from models.config import ModelConfig
from models.fused_likelihood import pixel_log_likelihood
from models.jtrvae import CircularVonMises, JTrVAE

PATCH = (6, 5)
VARIANTS = {  # the paper's name -> (n_classes, rotation, translation)
    "VAE": (0, False, False),
    "rVAE": (0, True, False),
    "trVAE": (0, True, True),
    "jVAE": (3, False, False),
    "jrVAE": (3, True, False),
    "jtrVAE": (3, True, True),
}


def _tiny(k: int, rotation: bool, translation: bool, **kw: object) -> JTrVAE:
    cfg = ModelConfig(
        patch=PATCH,
        n_classes=k,
        latent_dim=2,
        rotation=rotation,
        translation=translation,
        encoder_hidden=(8,),
        decoder_hidden=(8, 8),
        **kw,
    )
    return JTrVAE(cfg)


def _enum_traces(m: JTrVAE, x: torch.Tensor, beta: tuple[float, float, float] = (1.0, 1.0, 1.0)):
    guide_tr = poutine.trace(poutine.enum(m.guide, first_available_dim=-2)).get_trace(x, beta)
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x, beta)
    return guide_tr, model_tr


def _latent_sites(tr: poutine.Trace) -> set[str]:
    return {n for n in tr.stochastic_nodes if tr.nodes[n]["cond_indep_stack"]}  # inside the plate: not the plate


@pytest.mark.parametrize(("name", "decoder"), [(n, "mlp") for n in VARIANTS] + [("VAE", "dense"), ("jVAE", "dense")])
def test_sample_site_shapes(name: str, decoder: str) -> None:
    k, rotation, translation = VARIANTS[name]
    m = _tiny(k, rotation, translation, decoder=decoder)
    assert m.cfg.variant == name
    b = 4
    x = torch.rand(b, *PATCH)
    guide_tr, model_tr = _enum_traces(m, x)
    expected = {"z"} | ({"y"} if k else set()) | ({"angle"} if rotation else set())
    expected |= {"shift"} if translation else set()
    assert _latent_sites(guide_tr) == expected
    assert _latent_sites(model_tr) == expected and model_tr.observation_nodes == ["x"]
    assert guide_tr.nodes["z"]["value"].shape == (b, 2)
    if rotation:
        u = guide_tr.nodes["angle"]["value"]
        assert u.shape == (b, 2)
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(b))
    if translation:
        assert guide_tr.nodes["shift"]["value"].shape == (b, 2)
    obs = model_tr.nodes["x"]
    model_tr.compute_log_prob()
    lead = (k, b) if k else (b,)
    assert obs["fn"].batch_shape == lead and obs["fn"].event_shape == (PATCH[0] * PATCH[1],)
    assert obs["log_prob"].shape == lead


def test_class_is_enumerated_in_parallel_with_one_decoder_call(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _tiny(4, True, True)
    calls: list[tuple[int, ...]] = []
    real = m.decoder.log_likelihood

    def spy(*args: torch.Tensor, **kw: object) -> torch.Tensor:
        out = real(*args, **kw)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(m.decoder, "log_likelihood", spy)
    guide_tr, model_tr = _enum_traces(m, torch.rand(5, *PATCH))
    model_tr.compute_log_prob()
    y = guide_tr.nodes["y"]
    assert y["infer"]["enumerate"] == "parallel"
    assert y["value"].shape == (4, 1) and y["value"].reshape(-1).tolist() == [0, 1, 2, 3]
    assert calls == [(4, 5)]  # all four classes of all five images in one call


def test_enumerated_loss_equals_the_explicit_sum_over_classes() -> None:
    """TraceEnum_ELBO's loss, with the β weights, against the ELBO written out by hand for the same draws."""
    torch.manual_seed(0)
    m = _tiny(3, True, True).double()
    x = torch.rand(4, *PATCH, dtype=torch.float64)
    beta = (0.7, 1.3, 2.1)
    pyro.set_rng_seed(5)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(m.model, m.guide, x, beta)
    pyro.set_rng_seed(5)
    guide_tr, _ = _enum_traces(m, x, beta)
    z, u, s = (guide_tr.nodes[n]["value"] for n in ("z", "angle", "shift"))
    with torch.no_grad():
        q = m.encoder(x.reshape(4, 1, *PATCH))
        log_qy = torch.log_softmax(q["class_logits"], -1)  # (B, K)
        c, sn = u[:, 0, None], u[:, 1, None]
        gx, gy = m.grid[:, 0], m.grid[:, 1]
        coords = torch.stack([c * gx - sn * gy + s[:, :1], sn * gx + c * gy + s[:, 1:]], dim=-1)
        ll = torch.stack(
            [
                pixel_log_likelihood(
                    m.decoder(coords, z, F.one_hot(torch.full((4,), k), 3).double()),
                    x.reshape(4, -1),
                    "bernoulli",
                    0.1,
                ).sum(-1)
                for k in range(3)
            ],
            dim=-1,
        )  # (B, K), one decoder call per class
        qy = log_qy.exp()
        kl_y = (qy * (log_qy - math.log(1 / 3))).sum(-1)
        kl_z = dist.Normal(q["z_loc"], q["z_scale"]).log_prob(z).sum(-1) - dist.Normal(
            torch.zeros_like(z), 1.0
        ).log_prob(z).sum(-1)
        kl_u = dist.ProjectedNormal(q["angle_loc"]).log_prob(u) + math.log(2 * math.pi)
        kl_s = dist.Normal(q["shift_loc"], q["shift_scale"]).log_prob(s).sum(-1)
        kl_s = kl_s - dist.Normal(torch.zeros_like(s), m.cfg.translation_prior_scale).log_prob(s).sum(-1)
        expected = -(qy * ll).sum() + beta[2] * kl_y.sum() + beta[1] * kl_z.sum() + beta[0] * (kl_u + kl_s).sum()
    assert loss == pytest.approx(float(expected), rel=1e-10)


def test_enumerated_gradients_equal_the_explicit_sum_over_classes() -> None:
    """The encoder's gradients (class head included) from TraceEnum_ELBO equal those of the hand-written ELBO."""
    torch.manual_seed(1)
    m = _tiny(3, False, False).double()
    x = torch.rand(4, *PATCH, dtype=torch.float64)
    beta = (1.0, 1.5, 2.5)
    params = list(m.encoder.parameters())
    pyro.set_rng_seed(7)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(m.model, m.guide, x, beta)
    got = torch.autograd.grad(loss, params)
    pyro.set_rng_seed(7)
    guide_tr, _ = _enum_traces(m, x, beta)
    q = m.encoder(x.reshape(4, 1, *PATCH))
    eps = ((guide_tr.nodes["z"]["value"] - q["z_loc"]) / q["z_scale"]).detach()
    z = q["z_loc"] + q["z_scale"] * eps  # the same draw, reparametrised
    log_qy = torch.log_softmax(q["class_logits"], -1)
    qy = log_qy.exp()
    ll = torch.stack(
        [
            pixel_log_likelihood(
                m.decoder(m.grid.unsqueeze(0), z, F.one_hot(torch.full((4,), k), 3).double()),
                x.reshape(4, -1),
                "bernoulli",
                0.1,
            ).sum(-1)
            for k in range(3)
        ],
        dim=-1,
    )
    kl_y = (qy * (log_qy - math.log(1 / 3))).sum()
    kl_z = (dist.Normal(q["z_loc"], q["z_scale"]).log_prob(z) - dist.Normal(torch.zeros_like(z), 1.0).log_prob(z)).sum()
    want = torch.autograd.grad(-(qy * ll).sum() + beta[2] * kl_y + beta[1] * kl_z, params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_von_mises_prior_is_a_density_on_the_circle() -> None:
    prior = CircularVonMises(torch.tensor(2.5, dtype=torch.float64))
    t = torch.linspace(-math.pi, math.pi, 20001, dtype=torch.float64)
    u = torch.stack([t.cos(), t.sin()], -1)
    dens = prior.log_prob(u).exp()
    assert torch.trapezoid(dens, t).item() == pytest.approx(1.0, abs=1e-6)
    ref = dist.VonMises(torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)).log_prob(t)
    torch.testing.assert_close(prior.log_prob(u), ref)
    # and the model runs with it
    m = _tiny(2, True, False, angle_prior="von_mises", angle_prior_concentration=2.0)
    _, model_tr = _enum_traces(m, torch.rand(3, *PATCH))
    model_tr.compute_log_prob()
    assert model_tr.nodes["angle"]["log_prob"].shape == (3,)


def test_encode_and_generate() -> None:
    m = _tiny(3, True, True)
    x = torch.rand(7, 1, *PATCH)
    out = m.encode(x)
    assert set(out) == {"z", "z_scale", "class_logits", "class_prob", "angle", "shift"}
    torch.testing.assert_close(out["class_prob"].sum(-1), torch.ones(7))
    assert out["angle"].shape == (7,) and out["angle"].abs().max() <= math.pi
    img = m.generate(torch.zeros(7, 2), torch.arange(7) % 3, angle=torch.tensor(0.5), shift=torch.tensor([0.1, 0.0]))
    assert img.shape == (7, *PATCH) and img.min() >= 0 and img.max() <= 1
    # the decoder is a function of coordinates: turning by 2π draws the same image
    a = m.generate(torch.zeros(2, 2), torch.tensor([1, 2]), angle=torch.tensor(0.3))
    b = m.generate(torch.zeros(2, 2), torch.tensor([1, 2]), angle=torch.tensor(0.3 + 2 * math.pi))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pass y"):
        m.generate(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="do not match"):
        m.encode(torch.rand(2, 5, 5))


def test_dense_decoder_only_without_transforms() -> None:
    with pytest.raises(ValueError, match="dense decoder cannot draw a rotated or shifted grid"):
        _tiny(3, True, False, decoder="dense")
    m = _tiny(3, False, False, decoder="dense")
    z, y = torch.zeros(2, 2), torch.tensor([0, 2])
    assert m.generate(z, y).shape == (2, *PATCH)
    with pytest.raises(ValueError, match="leave angle and shift out"):
        m.generate(z, y, angle=torch.tensor(0.5))


def test_pixel_subsampled_likelihood_is_unbiased_and_only_while_training() -> None:
    """``pixel_fraction`` scores a random subset of m pixels weighted P/m: over many subsets the mean equals the
    full reconstruction term (same latents), and out of training mode every pixel is scored with weight 1."""
    torch.manual_seed(0)
    m = _tiny(3, True, True)
    x = torch.rand(4, *PATCH)
    guide_tr = poutine.trace(poutine.enum(m.guide, first_available_dim=-2)).get_trace(x)

    def scored() -> tuple[float, int, float]:
        tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x)
        tr.compute_log_prob()
        node = tr.nodes["x"]
        # Pyro stores the scaled log-density in "log_prob": already the estimate P/m · Σ over the subset.
        return float(node["log_prob"].detach().sum()), node["fn"].event_shape[0], float(node["scale"])

    m.train()
    full, n_full, weight = scored()
    assert (n_full, weight) == (PATCH[0] * PATCH[1], 1.0)
    m.pixel_fraction = 0.2
    draws = [scored() for _ in range(300)]
    assert {d[1] for d in draws} == {6} and {d[2] for d in draws} == {30 / 6}
    estimate = float(np.mean([d[0] for d in draws]))
    spread = float(np.std([d[0] for d in draws])) / math.sqrt(len(draws))
    assert abs(estimate - full) < 4 * spread, (estimate, full, spread)
    assert spread > 0  # the subsets really differ
    m.eval()
    assert scored()[1:] == (PATCH[0] * PATCH[1], 1.0)


def test_bfloat16_matmuls_only_while_training() -> None:
    """``likelihood_matmul`` is a training setting: validation, held-out ELBOs and evaluation score in full precision,
    so restarts and runs are compared on the same arithmetic whatever each trained with."""
    m = _tiny(2, True, False)
    m.likelihood_matmul = "bfloat16"
    x = torch.rand(3, *PATCH)
    guide_tr = poutine.trace(poutine.enum(m.guide, first_available_dim=-2)).get_trace(x)

    def matmul() -> str:
        fn = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x).nodes["x"]["fn"]
        return getattr(fn, "base_dist", fn).matmul

    m.train()
    assert matmul() == "bfloat16"
    m.eval()
    assert matmul() == "full"
