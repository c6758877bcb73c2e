r"""The joint rotation- and translation-invariant VAE (j-trVAE) and its five simpler relatives, as a Pyro model/guide.

Generative process for one image :math:`x` with :math:`P` pixels on the centred grid :math:`X`:

.. math::

    z &\sim \mathcal N(0, I_D), \qquad y \sim \mathrm{Categorical}(1/K, \dots, 1/K), \\
    u = (\cos\gamma, \sin\gamma) &\sim \mathrm{ProjectedNormal}(0) \text{ (uniform) or von Mises}(0, \kappa), \qquad
    s \sim \mathcal N(0, \sigma_s^2 I_2), \\
    X' &= R(\gamma) X + s, \qquad x_p \sim \mathrm{Bernoulli}(\sigma(f_\theta(X'_p, z, \mathrm{onehot}(y)))).

Guide: :math:`q(y|x)\,q(z|x)\,q(u|x)\,q(s|x)` from one encoder; ``y`` is enumerated in parallel, so the ELBO sums
over the K classes exactly (weights :math:`q(y|x)`), with one decoder call whose output has a leading K dim.

Loss (negative ELBO with the paper's weights, each β applied by ``poutine.scale`` to its own sites in both the
model and the guide, which scales exactly that KL term):

.. math::

    L = -\mathbb E_q \log p(x|\cdot) + \beta_1 \mathrm{KL}(q(s,u|x)\|p(s,u)) + \beta_2 \mathrm{KL}(q(z|x)\|p(z))
        + \beta_3 \mathrm{KL}(q(y|x)\|p(y)).

``n_classes=0`` drops ``y``; ``rotation``/``translation`` drop ``u``/``s`` — the paper's six variants.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor, nn

from models.config import ModelConfig
from models.coords import direction, pixel_grid, rotate_shift_grid
from models.fused_likelihood import MatmulPrecision
from models.nets import BroadcastDecoder, ConvEncoder, CoordDecoder, DenseDecoder, MLPEncoder, posterior_means

__all__ = ["CircularVonMises", "DecodedImage", "JTrVAE", "build_decoder", "build_encoder"]

# poutine.scale refuses 0; a β of 0 becomes this, which drops the term to within float rounding.
_MIN_BETA = 1e-12


class CircularVonMises(dist.TorchDistribution):
    """von Mises(0, κ) on the angle, as a distribution of the unit vector ``(cos γ, sin γ)``.

    The angle site holds a unit 2-vector (that is what ``ProjectedNormal`` samples), so the prior must be a density
    on the circle with respect to arc length — the measure ``ProjectedNormal.log_prob`` uses — which for von Mises is
    :math:`\\exp(\\kappa\\cos\\gamma) / (2\\pi I_0(\\kappa))` with :math:`\\cos\\gamma = u_0`. The KL to the
    projected-normal posterior is then estimated honestly, by the same Monte Carlo as every other site.
    """

    arg_constraints = {"concentration": constraints.positive}  # noqa: RUF012
    support = constraints.sphere
    has_rsample = False

    def __init__(self, concentration: Tensor, *, validate_args: bool | None = None) -> None:
        self.concentration = concentration
        super().__init__(concentration.shape, torch.Size([2]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: CircularVonMises | None = None) -> CircularVonMises:
        return CircularVonMises(self.concentration.expand(batch_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        k = self.concentration
        log_norm = math.log(2 * math.pi) + torch.log(torch.special.i0e(k)) + k
        return k * value[..., 0] - log_norm

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        angle = dist.VonMises(torch.zeros_like(self.concentration), self.concentration).sample(sample_shape)
        return direction(angle)


class DecodedImage(dist.TorchDistribution):
    """``p(x | X', z, y)``: independent pixels given the decoder, batch ``(..., B)``, event ``(P,)``.

    ``log_prob`` goes through the decoder's ``log_likelihood`` (the fused kernel for the coordinate MLP), so the
    per-pixel logits of all K enumerated classes never need to exist at once. Pixels are grey levels in [0, 1]
    scored with the Bernoulli cross-entropy as in the paper, so no support check is made on the observation.
    """

    arg_constraints = {}  # noqa: RUF012
    support = constraints.independent(constraints.real, 1)

    def __init__(
        self,
        decoder: nn.Module,
        coords: Tensor,
        z: Tensor,
        onehot: Tensor | None,
        likelihood: str,
        gaussian_scale: float,
        threads: int = 1,
        matmul: MatmulPrecision = "full",
    ) -> None:
        self.decoder, self.coords, self.z, self.onehot = decoder, coords, z, onehot
        self.likelihood, self.gaussian_scale, self.threads, self.matmul = likelihood, gaussian_scale, threads, matmul
        lead = torch.broadcast_shapes(z.shape[:-1], () if onehot is None else onehot.shape[:-1], coords.shape[:-2])
        super().__init__(lead, coords.shape[-2:-1], validate_args=False)

    def logits(self) -> Tensor:
        return self.decoder(self.coords, self.z, self.onehot).expand(*self.batch_shape, *self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.decoder.log_likelihood(
            self.coords,
            self.z,
            self.onehot,
            value,
            likelihood=self.likelihood,
            gaussian_scale=self.gaussian_scale,
            threads=self.threads,
            matmul=self.matmul,
        )

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        with torch.no_grad():
            mean = torch.sigmoid(self.logits())
            if self.likelihood == "bernoulli":
                return torch.bernoulli(mean.expand(*sample_shape, *mean.shape))
            return torch.normal(mean.expand(*sample_shape, *mean.shape), self.gaussian_scale)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    common = {
        "latent_dim": cfg.latent_dim,
        "n_classes": cfg.n_classes,
        "rotation": cfg.rotation,
        "translation": cfg.translation,
        "invariant_class": cfg.class_head == "invariant",
        "class_rotation": cfg.class_rotation,
        "class_quantiles": cfg.class_quantiles,
        "class_moments": cfg.class_moments,
    }
    if cfg.encoder == "mlp":
        return MLPEncoder(cfg.patch, hidden=cfg.encoder_hidden, **common)
    return ConvEncoder(cfg.patch, channels=cfg.conv_channels, hidden=cfg.encoder_hidden[-1], **common)


def build_decoder(cfg: ModelConfig) -> nn.Module:
    if cfg.decoder == "mlp":
        return CoordDecoder(latent_dim=cfg.latent_dim, n_classes=cfg.n_classes, hidden=cfg.decoder_hidden)
    if cfg.decoder == "dense":
        n_pixels = cfg.patch[0] * cfg.patch[1]
        return DenseDecoder(n_pixels, latent_dim=cfg.latent_dim, n_classes=cfg.n_classes, hidden=cfg.decoder_hidden)
    return BroadcastDecoder(cfg.patch, latent_dim=cfg.latent_dim, n_classes=cfg.n_classes, channels=cfg.conv_channels)


def _scale(beta: float) -> poutine.scale:
    return poutine.scale(scale=max(float(beta), _MIN_BETA))


class JTrVAE(nn.Module):
    """Encoder, decoder and the Pyro ``model``/``guide`` that tie them into the VAE variant ``cfg`` describes.

    The constructor only builds networks (no seeding, no param store); ``models.train.fit`` owns the global state.
    ``likelihood_threads`` is how many CPU threads the coordinate decoder's fused likelihood spreads its chunks over
    (``models.fused_likelihood``); it is a setting of the machine, not of the model, so it is not saved with it.
    ``pixel_fraction`` < 1 scores a random subset of the pixels per step while in training mode (an unbiased,
    cheaper estimate of the reconstruction term: the decoder's cost is pixels × classes × hidden²); ``eval()`` and
    everything after training score every pixel. Also a training setting, not saved. So is ``likelihood_matmul``,
    the precision of the fused kernel's matmul operands (``models.fused_likelihood.MatmulPrecision``).
    """

    def __init__(self, cfg: ModelConfig, *, likelihood_threads: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.likelihood_threads = likelihood_threads
        self.likelihood_matmul: MatmulPrecision = "full"
        self.pixel_fraction = 1.0
        self.encoder = build_encoder(cfg)
        self.decoder = build_decoder(cfg)
        self.register_buffer("grid", pixel_grid(*cfg.patch, dtype=torch.get_default_dtype()), persistent=False)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _flat(self, x: Tensor) -> Tensor:
        ph, pw = self.cfg.patch
        if x.shape[-2:] != (ph, pw):
            raise ValueError(f"images of shape {tuple(x.shape)} do not match the model's patch {self.cfg.patch}")
        return x.reshape(x.shape[0], 1, ph, pw)

    def _angle_prior(self, x: Tensor, batch: int) -> dist.TorchDistribution:
        if self.cfg.angle_prior == "von_mises":
            return CircularVonMises(x.new_full((batch,), self.cfg.angle_prior_concentration))
        return dist.ProjectedNormal(x.new_zeros(batch, 2))

    # ---- Pyro model and guide ----------------------------------------------------------------------------------
    def model(self, x: Tensor, beta: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        pyro.module("decoder", self.decoder)
        cfg = self.cfg
        x = self._flat(x)
        b = x.shape[0]
        unit = shift = onehot = None
        with pyro.plate("data", b):
            with _scale(beta[1]):
                z = pyro.sample("z", dist.Normal(x.new_zeros(b, cfg.latent_dim), 1.0).to_event(1))
            if cfg.n_classes > 0:
                with _scale(beta[2]):
                    y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(b, cfg.n_classes)))
                onehot = F.one_hot(y, cfg.n_classes).to(x.dtype)  # (K, 1, K) under enumeration
            if cfg.rotation:
                with _scale(beta[0]):
                    unit = pyro.sample("angle", self._angle_prior(x, b))
            if cfg.translation:
                with _scale(beta[0]):
                    prior = dist.Normal(x.new_zeros(b, 2), cfg.translation_prior_scale).to_event(1)
                    shift = pyro.sample("shift", prior)
            grid, obs, weight = self._scored_pixels(x.reshape(b, -1))
            coords = rotate_shift_grid(grid.to(x.dtype), unit, shift)
            pixels = DecodedImage(
                self.decoder,
                coords,
                z,
                onehot,
                cfg.likelihood,
                cfg.gaussian_scale,
                self.likelihood_threads,
                self.likelihood_matmul if self.training else "full",  # validation and evaluation: full precision
            )
            with poutine.scale(scale=weight):
                pyro.sample("x", pixels, obs=obs)  # batch (K, B) under enumeration: one decoder call

    def _scored_pixels(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """The grid rows and observed pixels the likelihood scores, and the weight P/m that keeps it unbiased: every
        pixel (weight 1) unless training with ``pixel_fraction`` < 1, then one random subset shared by the batch."""
        n_pixels = self.grid.shape[0]
        keep = max(1, round(self.pixel_fraction * n_pixels))
        if not self.training or keep >= n_pixels:
            return self.grid, x, 1.0
        idx = torch.randperm(n_pixels, device=x.device)[:keep]
        return self.grid[idx], x[:, idx], n_pixels / keep

    def guide(self, x: Tensor, beta: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        pyro.module("encoder", self.encoder)
        cfg = self.cfg
        x = self._flat(x)
        q = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            with _scale(beta[1]):
                pyro.sample("z", dist.Normal(q["z_loc"], q["z_scale"]).to_event(1))
            if cfg.n_classes > 0:
                with _scale(beta[2]):
                    pyro.sample("y", dist.Categorical(logits=q["class_logits"]), infer={"enumerate": "parallel"})
            if cfg.rotation:
                with _scale(beta[0]):
                    pyro.sample("angle", dist.ProjectedNormal(q["angle_loc"]))
            if cfg.translation:
                with _scale(beta[0]):
                    pyro.sample("shift", dist.Normal(q["shift_loc"], q["shift_scale"]).to_event(1))

    # ---- inference-time helpers ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Posterior means (and ``z_scale``) of a batch ``(B, H, W)`` or ``(B, 1, H, W)``, by ``posterior_means``.

        The mean of z is returned as ``z`` (its name in maps, encodings files and metrics), the rest under the
        exported names: ``class_logits``, ``class_prob``, ``z_scale``, ``angle`` (radians, the direction of the
        projected normal's concentration), ``shift`` (``(s_x, s_y)`` in grid units, 1 = half the longer patch side);
        see ``models.coords`` for the conventions.
        """
        cfg = self.cfg
        out = posterior_means(
            self.encoder(self._flat(x)), n_classes=cfg.n_classes, rotation=cfg.rotation, translation=cfg.translation
        )
        out["z"] = out.pop("z_loc")
        return out

    @torch.no_grad()
    def generate(
        self, z: Tensor, y: Tensor | None = None, angle: Tensor | None = None, shift: Tensor | None = None
    ) -> Tensor:
        """Pixel means ``(N, H, W)`` in [0, 1] for latents ``z`` ``(N, D)``, classes ``y`` (N,) and optional transforms.

        ``angle`` (radians, scalar or ``(N,)``) and ``shift`` (``(2,)`` or ``(N, 2)``) may be given even for a model
        trained without them — the coordinate decoders are functions of coordinates, so they draw any rotation (the
        dense decoder is not, and refuses).
        """
        cfg = self.cfg
        if cfg.decoder == "dense" and (angle is not None or shift is not None):
            raise ValueError("a dense decoder draws untransformed images only: leave angle and shift out")
        n = z.shape[0]
        onehot = None
        if cfg.n_classes > 0:
            if y is None:
                raise ValueError(f"this model has {cfg.n_classes} classes: pass y, a LongTensor of class indices")
            onehot = F.one_hot(y.long().reshape(-1).expand(n), cfg.n_classes).to(z.dtype)
        unit = None if angle is None else direction(torch.as_tensor(angle, dtype=z.dtype, device=z.device).expand(n))
        if shift is not None:
            shift = torch.as_tensor(shift, dtype=z.dtype, device=z.device).expand(n, 2)
        coords = rotate_shift_grid(self.grid.to(z.dtype), unit, shift)
        logits = self.decoder(coords, z, onehot).expand(n, -1)
        return torch.sigmoid(logits).reshape(n, *cfg.patch)
