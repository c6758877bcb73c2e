"""The networks of the VAE family: pure torch modules, no Pyro.

Keeping Pyro out of this file is what lets the exporter script or trace the encoder and ship it to a server that
has no Pyro installed; the probabilistic model that wires these networks together lives in ``models.jtrvae``.

Encoders map an image batch ``(B, 1, H, W)`` to a dict of posterior parameters:

* ``z_loc``, ``z_scale`` ``(B, D)`` — Normal posterior of the continuous latent;
* ``class_logits`` ``(B, K)`` — only when ``K > 0``;
* ``angle_loc`` ``(B, 2)`` — only with rotation: the concentration vector of a projected normal, whose direction
  is the mean angle ``atan2(angle_loc[:, 1], angle_loc[:, 0])`` and whose length is the certainty;
* ``shift_loc``, ``shift_scale`` ``(B, 2)`` — only with translation: Normal posterior of ``(s_x, s_y)`` in grid units.

All heads come out of one linear layer and are sliced, which is cheaper than one small matmul per head and keeps
the module TorchScript-friendly.

Decoders map transformed pixel coordinates ``(..., B, P, 2)``, the latent ``z`` ``(..., B, D)`` and an optional
one-hot class ``y`` ``(..., K)`` (broadcastable against ``(..., B, K)``) to per-pixel logits ``(..., B, P)``.
Everything broadcasts, which is what lets one decoder call cover all K enumerated classes at once. Training
calls ``log_likelihood(coords, z, y, x, ...)`` instead, which returns ``Σ_p log p(x_p | ·)`` of shape ``(..., B)``
without keeping per-pixel activations (``models.fused_likelihood``).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fused_likelihood import CHUNK_ROWS, MatmulPrecision, coord_mlp_log_likelihood, pixel_log_likelihood
from models.likelihood_path import likelihood_path

__all__ = [
    "BroadcastDecoder",
    "ConvEncoder",
    "CoordDecoder",
    "DenseDecoder",
    "InvariantClassHead",
    "InvariantFeatures",
    "MLPEncoder",
    "posterior_means",
]

_MIN_SCALE = 1e-4


class _Heads(nn.Module):
    """All posterior heads as one linear layer, sliced into named outputs."""

    def __init__(self, hidden: int, latent_dim: int, n_classes: int, rotation: bool, translation: bool) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.n_classes = n_classes
        self.rotation = rotation
        self.translation = translation
        self.min_scale = _MIN_SCALE
        width = 2 * latent_dim + n_classes + (2 if rotation else 0) + (4 if translation else 0)
        self.linear = nn.Linear(hidden, width)

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        o = self.linear(h)
        d = self.latent_dim
        out: dict[str, Tensor] = {
            "z_loc": o[:, :d],
            "z_scale": F.softplus(o[:, d : 2 * d]) + self.min_scale,
        }
        i = 2 * d
        if self.n_classes > 0:
            out["class_logits"] = o[:, i : i + self.n_classes]
            i += self.n_classes
        if self.rotation:
            out["angle_loc"] = o[:, i : i + 2]
            i += 2
        if self.translation:
            out["shift_loc"] = o[:, i : i + 2]
            out["shift_scale"] = F.softplus(o[:, i + 2 : i + 4]) + self.min_scale
        return out


class InvariantFeatures(nn.Module):
    r"""Features of a patch that the model's own transforms leave unchanged, as fixed linear maps (exportable).

    * translation on: the magnitude of the 2-D discrete Fourier transform (centred), which a shift does not change —
      computed as matmuls with fixed cosine and sine matrices, so ONNX and TorchScript see plain MatMul/Sqrt;
    * rotation on: those values (or the pixels) sampled bilinearly on rings about the centre, and of each ring the
      magnitudes of its first angular harmonics :math:`|\sum_\theta f(r,\theta) e^{-im\theta}|`, which a rotation
      about the centre does not change;
    * both off: the pixels;
    * with ``quantiles`` > 0 and any invariance on, also the patch's own intensity distribution: its sorted pixel
      values at ``quantiles`` evenly spaced ranks, which no rearrangement of the pixels — so no rotation or shift —
      changes.

    ``½·log1p(|·|²)`` compresses the spectrum's range (the log of the magnitude for large values, with no square root
    whose slope at 0 would turn float rounding into export-parity errors); per-feature ``mean``/``scale`` buffers
    (set from the training patches by ``calibrate``, saved with the weights) standardise them.

    Why the class head reads these and not the pixels: an MLP on pixels must learn from examples that a rotated or
    shifted suit is the same suit, and on atom-centred or grid patches the same freedom lets the class split by
    sublattice or registration; here it cannot.

    Why the intensity quantiles: the spectrum is taken of the mean-free patch and the ring harmonics keep only
    magnitudes, so how bright a patch is — what tells a heavier cation's film from its substrate in Z-contrast —
    reaches those features only indirectly. Measured (docs/training.md): the warm start's film/substrate balanced
    accuracy on the real PbTiO3/SrRuO3 scan rises from 0.931 to 0.998 with them, and on the demo lattice from
    0.79–0.86 to 0.86–0.97.
    """

    def __init__(
        self,
        patch: tuple[int, int],
        *,
        rotation: bool,
        translation: bool,
        harmonics: int = 8,
        n_angles: int = 32,
        quantiles: int = 0,
    ) -> None:
        super().__init__()
        h, w = patch
        self.rotation, self.translation = rotation, translation
        self.quantiles = quantiles if (rotation or translation) else 0
        ranks = torch.linspace(0, h * w - 1, self.quantiles, dtype=torch.float64).round().long()
        self.register_buffer("quantile_ranks", ranks, persistent=False)
        if translation:
            for name, n in (("h", h), ("w", w)):
                k = torch.arange(n, dtype=torch.float64)
                rows = (k - n // 2) % n  # fftshift: row i holds frequency i - n // 2
                phase = 2 * math.pi * torch.outer(rows, k) / n
                self.register_buffer(f"cos_{name}", torch.cos(phase).float(), persistent=False)
                self.register_buffer(f"sin_{name}", torch.sin(phase).float(), persistent=False)
        n_features = h * w
        if rotation:
            centre = (h // 2, w // 2) if translation else ((h - 1) / 2, (w - 1) / 2)
            n_radii = max(2, min(h, w) // 2)
            radii = (torch.arange(n_radii, dtype=torch.float64) + 0.5) * (min(h, w) / 2 / n_radii)
            theta = torch.arange(n_angles, dtype=torch.float64) * (2 * math.pi / n_angles)
            ys = (centre[0] + radii[:, None] * torch.sin(theta)[None]).reshape(-1)
            xs = (centre[1] + radii[:, None] * torch.cos(theta)[None]).reshape(-1)
            if translation:
                # The spectrum is periodic (index 0 holds the Nyquist frequency, next to +n/2 - 1 at the far end):
                # interpolating across that seam keeps the outer ring exactly invariant to a quarter turn.
                y0, x0 = ys.floor(), xs.floor()
                fy, fx = ys - y0, xs - x0
                y0, x0 = y0.long() % h, x0.long() % w
                y1, x1 = (y0 + 1) % h, (x0 + 1) % w
            else:
                ys, xs = ys.clamp(0, h - 1), xs.clamp(0, w - 1)
                y0, x0 = ys.floor().clamp(max=h - 2 if h > 1 else 0), xs.floor().clamp(max=w - 2 if w > 1 else 0)
                fy, fx = ys - y0, xs - x0
                y0, x0 = y0.long(), x0.long()
                y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
            index = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=-1)
            weight = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], dim=-1)
            self.register_buffer("ring_index", index, persistent=False)
            self.register_buffer("ring_weight", weight.float(), persistent=False)
            m = torch.arange(harmonics + 1, dtype=torch.float64)
            ang = torch.outer(theta, m)
            self.register_buffer("harm_cos", torch.cos(ang).float(), persistent=False)
            self.register_buffer("harm_sin", torch.sin(ang).float(), persistent=False)
            self.n_radii, self.n_angles = n_radii, n_angles
            n_features = n_radii * (harmonics + 1)
        self.n_features = n_features + self.quantiles
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("scale", torch.ones(self.n_features))

    def raw(self, x: Tensor) -> Tensor:
        """Unstandardised features ``(B, F)`` of patches ``(B, 1, H, W)``."""
        spectral = self._spectral(x[:, 0])
        if self.quantiles == 0:
            return spectral
        ordered = torch.sort(x.reshape(x.shape[0], -1), dim=1).values
        return torch.cat([spectral, ordered[:, self.quantile_ranks]], dim=1)

    def _spectral(self, f: Tensor) -> Tensor:
        if self.translation:
            f = f - f.mean(dim=(-2, -1), keepdim=True)
            a = self.cos_h @ f  # (B, H, W): transform along rows ...
            b = self.sin_h @ f
            re = a @ self.cos_w.T - b @ self.sin_w.T  # ... then along columns (the sign of Im does not matter)
            im = a @ self.sin_w.T + b @ self.cos_w.T
            f = 0.5 * torch.log1p(re * re + im * im)  # log of the magnitude, with no sqrt to amplify rounding near 0
        flat = f.reshape(f.shape[0], -1)
        if not self.rotation:
            return flat
        rings = (flat[:, self.ring_index] * self.ring_weight).sum(-1)  # (B, R·T)
        rings = rings.reshape(-1, self.n_radii, self.n_angles)
        c, s = rings @ self.harm_cos, rings @ self.harm_sin
        return 0.5 * torch.log1p(c * c + s * s).reshape(f.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        return (self.raw(x) - self.mean) / self.scale

    @torch.no_grad()
    def calibrate(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """Set ``mean``/``scale`` to the per-feature mean and standard deviation over the patches ``x``, and return
        the standardised features of ``x`` ``(N, F)`` (what ``forward`` now gives, without computing them twice)."""
        feats = torch.cat([self.raw(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        std = feats.std(dim=0) if feats.shape[0] > 1 else torch.ones_like(feats[0])
        self.mean.copy_(feats.mean(dim=0))
        # A floor at 5 % of the typical spread: a feature that barely varies (the zero frequency of a mean-free
        # patch) carries only float rounding, which dividing by its own tiny spread would blow up into the logits —
        # and into differences between the ONNX and eager encoders far above the export's 1e-4 parity tolerance.
        self.scale.copy_(std.clamp_min(0.05 * float(std.mean().clamp_min(1e-6))))
        return (feats - self.mean) / self.scale


class InvariantClassHead(nn.Module):
    """Class logits from ``InvariantFeatures`` through one tanh layer: a class that ignores the model's transforms."""

    def __init__(
        self,
        patch: tuple[int, int],
        *,
        n_classes: int,
        rotation: bool,
        translation: bool,
        quantiles: int = 0,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        self.features = InvariantFeatures(patch, rotation=rotation, translation=translation, quantiles=quantiles)
        self.net = nn.Sequential(nn.Linear(self.features.n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.features(x))


def posterior_means(
    heads: dict[str, Tensor], *, n_classes: int, rotation: bool, translation: bool, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The guide's posterior means from an encoder's heads, under the exported output names.

    ``class_logits`` and ``class_prob = softmax(class_logits)`` (when ``n_classes > 0``), ``z_loc`` (the mean of z)
    and ``z_scale``, ``angle`` (with rotation: the mean direction ``atan2(c_y, c_x)`` of the projected normal's
    concentration, radians in (-π, π]) and ``shift`` (with translation: the loc of q(s|x), ``(s_x, s_y)``).

    ``JTrVAE.encode`` and the export wrapper both call this one function, so what is served cannot drift from what
    the model reports. ``dtype`` converts each head first: the fp16 export does its softmax and ``atan2`` in float32,
    where the ill-conditioned angle of a weak concentration is safest. Pure tensor code, so it traces and exports.
    """

    def head(name: str) -> Tensor:
        return heads[name] if dtype is None else heads[name].to(dtype)

    out: dict[str, Tensor] = {}
    if n_classes > 0:
        logits = head("class_logits")
        out["class_logits"] = logits
        out["class_prob"] = torch.softmax(logits, dim=-1)
    out["z_loc"] = head("z_loc")
    out["z_scale"] = head("z_scale")
    if rotation:
        c = head("angle_loc")
        out["angle"] = torch.atan2(c[:, 1], c[:, 0])
    if translation:
        out["shift"] = head("shift_loc")
    return out


class _Encoder(nn.Module):
    """A trunk (set by the subclass) and the posterior heads; the class logits come from an ``InvariantClassHead``
    on the input instead of the trunk when ``invariant_class`` (``ModelConfig.class_head == "invariant"``)."""

    def _attach_heads(
        self,
        patch: tuple[int, int],
        width: int,
        latent_dim: int,
        n_classes: int,
        rotation: bool,
        translation: bool,
        invariant_class: bool,
        class_quantiles: int = 0,
    ) -> None:
        branch = invariant_class and n_classes > 0
        self.heads = _Heads(width, latent_dim, 0 if branch else n_classes, rotation, translation)
        self.class_head = (
            InvariantClassHead(
                patch, n_classes=n_classes, rotation=rotation, translation=translation, quantiles=class_quantiles
            )
            if branch
            else None
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.heads(self.trunk(x))
        if self.class_head is not None:
            out["class_logits"] = self.class_head(x)
        return out


class MLPEncoder(_Encoder):
    """The paper's inference network: the flattened image through tanh layers (2×256 by default), then the heads."""

    def __init__(
        self,
        patch: tuple[int, int],
        *,
        latent_dim: int,
        n_classes: int,
        rotation: bool,
        translation: bool,
        hidden: tuple[int, ...] = (256, 256),
        invariant_class: bool = False,
        class_quantiles: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = patch[0] * patch[1]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self._attach_heads(patch, width, latent_dim, n_classes, rotation, translation, invariant_class, class_quantiles)


class ConvEncoder(_Encoder):
    """Strided 3×3 convolutions (each halves the patch), then one tanh layer and the heads.

    For larger patches, where a dense first layer on ``H·W`` inputs gets big and ignores locality.
    """

    def __init__(
        self,
        patch: tuple[int, int],
        *,
        latent_dim: int,
        n_classes: int,
        rotation: bool,
        translation: bool,
        channels: tuple[int, ...] = (32, 64, 128),
        hidden: int = 256,
        invariant_class: bool = False,
        class_quantiles: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, h, w = 1, patch[0], patch[1]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU()]
            c_in, h, w = c, (h + 1) // 2, (w + 1) // 2
        layers += [nn.Flatten(), nn.Linear(c_in * h * w, hidden), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self._attach_heads(
            patch, hidden, latent_dim, n_classes, rotation, translation, invariant_class, class_quantiles
        )


class _AutogradLikelihood(nn.Module):
    """``log_likelihood`` by plain autograd through the materialised logits: the dense and broadcast decoders always,
    the coordinate decoder off the CPU (where its fused kernel is not used, ``models.likelihood_path``)."""

    def log_likelihood(
        self,
        coords: Tensor,
        z: Tensor,
        y: Tensor | None,
        x: Tensor,
        *,
        likelihood: str,
        gaussian_scale: float,
        threads: int = 1,
        matmul: MatmulPrecision = "full",
    ) -> Tensor:
        """``Σ_p log p(x_p | decoder)`` per (…, image), ``(..., B)``; ``threads`` and ``matmul`` are accepted for the
        coordinate decoder's interface and unused (one autograd pass has no chunks to spread)."""
        return pixel_log_likelihood(self(coords, z, y), x, likelihood, gaussian_scale).sum(-1)


class CoordDecoder(_AutogradLikelihood):
    """An MLP (3×256 tanh by default) evaluated at every transformed pixel coordinate, conditioned on ``z`` and ``y``.

    The first layer is linear in ``[coords, z, y]``, so it is split into three parts that are computed at the size
    each one needs and added by broadcasting: ``W_c·X'`` once per image and pixel (it does not depend on the class),
    ``W_z·z`` once per image, ``W_y·y`` once per class (a row of ``W_y`` for a one-hot ``y``). Concatenating inputs
    expanded to ``K×B×P×(2+D+K)`` would compute the same thing with a lot of copying and repeated work.
    """

    def __init__(self, *, latent_dim: int, n_classes: int, hidden: tuple[int, ...] = (256, 256, 256)) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("decoder_hidden is empty; the coordinate decoder needs at least one hidden layer")
        self.coord = nn.Linear(2, hidden[0])
        self.latent = nn.Linear(latent_dim, hidden[0], bias=False)
        self.label = nn.Linear(n_classes, hidden[0], bias=False) if n_classes > 0 else None
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(hidden))
        self.out = nn.Linear(hidden[-1], 1)
        # A coordinate MLP is a sum of ridge functions of the coordinates; a wider spread of first-layer slopes
        # than PyTorch's default (fan-in 2 gives slopes of at most 0.7) lets it draw sharp card edges early.
        nn.init.uniform_(self.coord.weight, -math.sqrt(3.0), math.sqrt(3.0))

    def latent_part(self, z: Tensor, y: Tensor | None) -> Tensor:
        """``W_z·z + W_y·y``, the class- and image-dependent part of the first layer, ``(..., B, H)``."""
        lat = self.latent(z)
        if self.label is not None and y is not None:
            lat = lat + self.label(y)
        return lat

    def forward(self, coords: Tensor, z: Tensor, y: Tensor | None = None) -> Tensor:
        h = torch.tanh(self.coord(coords) + self.latent_part(z, y).unsqueeze(-2))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(h).squeeze(-1)

    def log_likelihood(
        self,
        coords: Tensor,
        z: Tensor,
        y: Tensor | None,
        x: Tensor,
        *,
        likelihood: str,
        gaussian_scale: float,
        threads: int = 1,
        chunk_rows: int = CHUNK_ROWS,
        matmul: MatmulPrecision = "full",
    ) -> Tensor:
        """``Σ_p log p(x_p | decoder)`` per (…, image), ``(..., B)``, by the fused cache-sized kernel.

        Same value and gradients as ``pixel_log_likelihood(self(coords, z, y), x, ...).sum(-1)`` without
        materialising the ``(..., B, P, H)`` activations; ``threads`` and ``chunk_rows`` say how the work is cut and
        spread, ``matmul`` the precision of its matmul operands (``models.fused_likelihood.coord_mlp_log_likelihood``).
        Off the CPU it is that autograd expression itself (``models.likelihood_path``).
        """
        if likelihood_path(coords.device) == "autograd":
            return super().log_likelihood(coords, z, y, x, likelihood=likelihood, gaussian_scale=gaussian_scale)
        return coord_mlp_log_likelihood(
            coords,
            self.latent_part(z, y),
            x,
            coord_weight=self.coord.weight,
            coord_bias=self.coord.bias,
            hidden=[(layer.weight, layer.bias) for layer in self.hidden],
            out_weight=self.out.weight,
            out_bias=self.out.bias,
            likelihood=likelihood,
            gaussian_scale=gaussian_scale,
            threads=threads,
            chunk_rows=chunk_rows,
            matmul=matmul,
        )


class DenseDecoder(_AutogradLikelihood):
    """A plain MLP from ``(z, y)`` to every pixel at once: the decoder of a VAE that infers no transform.

    It ignores the coordinates (only their count is used), so it cannot draw a rotation or a shift, and is valid only
    for variants without them. It exists because that is what the paper's j-VAE baseline is (pyroVED switches to a
    fully connected decoder when no invariance is on), so a comparison with j-trVAE is against the model the paper
    compared with; its last layer holds a free template per pixel instead of a smooth function of position. (On the
    cards it sorts the suits no better than the coordinate decoder did: docs/cards.md.) The first layer is split as in
    :class:`CoordDecoder` so the K enumerated classes cost one ``W_y`` row each.
    """

    def __init__(
        self, n_pixels: int, *, latent_dim: int, n_classes: int, hidden: tuple[int, ...] = (256, 256, 256)
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("decoder_hidden is empty; the dense decoder needs at least one hidden layer")
        self.latent = nn.Linear(latent_dim, hidden[0])
        self.label = nn.Linear(n_classes, hidden[0], bias=False) if n_classes > 0 else None
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(hidden))
        self.out = nn.Linear(hidden[-1], n_pixels)

    def forward(self, coords: Tensor, z: Tensor, y: Tensor | None = None) -> Tensor:
        if coords.shape[-2] != self.out.out_features:
            raise ValueError(f"this decoder draws {self.out.out_features} pixels, the grid has {coords.shape[-2]}")
        h = self.latent(z)
        if self.label is not None:
            if y is None:
                raise ValueError("this decoder has classes: pass the one-hot class y")
            h = h + self.label(y)
        h = torch.tanh(h)
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(h)


class BroadcastDecoder(_AutogradLikelihood):
    """The supplement's spatial-broadcast decoder: 3×3 convolutions over the transformed-coordinate image.

    The latent (``z`` and one-hot ``y``) enters every layer: the paper stacks the tiled latent as extra channels at
    each layer; we add a per-layer 1×1 projection of it, which is that same skip connection without building the
    tiled channels (it differs only in how zero padding treats the border).
    """

    def __init__(
        self,
        patch: tuple[int, int],
        *,
        latent_dim: int,
        n_classes: int,
        channels: tuple[int, ...] = (64, 64, 64),
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("conv_channels is empty; the broadcast decoder needs at least one layer")
        self.patch = patch
        self.n_classes = n_classes
        latent_in = latent_dim + n_classes
        self.convs = nn.ModuleList()
        self.skips = nn.ModuleList()
        c_in = 2
        for c in channels:
            self.convs.append(nn.Conv2d(c_in, c, 3, padding=1))
            self.skips.append(nn.Linear(latent_in, c, bias=False))
            c_in = c
        self.out = nn.Conv2d(c_in, 1, 1)

    def forward(self, coords: Tensor, z: Tensor, y: Tensor | None = None) -> Tensor:
        ph, pw = self.patch
        if self.n_classes > 0:
            if y is None:
                raise ValueError("this decoder has classes: pass the one-hot class y")
            shape = torch.broadcast_shapes(z.shape[:-1], y.shape[:-1])
            lat = torch.cat([z.expand(*shape, z.shape[-1]), y.expand(*shape, y.shape[-1])], dim=-1)
        else:
            lat = z
        lead = torch.broadcast_shapes(coords.shape[:-2], lat.shape[:-1])
        img = coords.movedim(-1, -2).unflatten(-1, (ph, pw))  # (..., 2, ph, pw)
        h = self.convs[0](img.reshape(-1, 2, ph, pw)).reshape(*img.shape[:-3], -1, ph, pw)
        h = torch.tanh(h + self.skips[0](lat)[..., None, None]).expand(*lead, -1, ph, pw)
        for conv, skip in zip(self.convs[1:], self.skips[1:], strict=True):
            b = skip(lat).expand(*lead, -1)
            h = conv(h.reshape(-1, *h.shape[-3:])).reshape(*lead, -1, ph, pw)
            h = torch.tanh(h + b[..., None, None])
        out = self.out(h.reshape(-1, *h.shape[-3:]))
        return out.reshape(*lead, ph * pw)
