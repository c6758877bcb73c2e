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
        return self.split(self.linear(h))

    def split(self, o: Tensor) -> dict[str, Tensor]:
        """The named heads from the layer's output ``(B, width)``."""
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


#: The intensity moments ``InvariantFeatures`` can read, in order (``moments=n`` reads the first n).
_MOMENTS = ("mean", "standard deviation", "skewness", "kurtosis", "minimum", "maximum")


def _intensity_moments(flat: Tensor, n: int) -> Tensor:
    """The first ``n`` of mean, standard deviation, skewness, kurtosis, minimum and maximum of each row of ``flat``.

    Why these and not sorted values: both describe the patch's own intensity distribution and neither moves under
    any rearrangement of its pixels, but a sort of every patch cost more than the rest of the encoder together (the
    exported TopK was 58 % of its time) while these are a few passes over the pixels. The extremes are the
    quantiles a point defect moves most (a vacancy's dark pixel, a heavy substitution's bright one): without them
    the joint defect score on the demo lattice lost precision (docs/training.md). The ε keeps a flat patch's
    skewness and kurtosis finite and equal in every runtime: divided by a near-zero spread, float rounding would
    become feature differences.
    """
    mean = flat.mean(dim=1, keepdim=True)
    out = [mean]
    if n > 1:
        centred = flat - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        out.append(torch.sqrt(var + 1e-12))
        if n > 2:
            cubed = centred * centred * centred
            out.append(cubed.mean(dim=1, keepdim=True) / (var * out[1] + 1e-9))
        if n > 3:
            out.append((cubed * centred).mean(dim=1, keepdim=True) / (var * var + 1e-9))
    if n > 4:
        out.append(flat.amin(dim=1, keepdim=True))
    if n > 5:
        out.append(flat.amax(dim=1, keepdim=True))
    return torch.cat(out, dim=1)


def _ring_harmonics(patch: tuple[int, int], spectral: bool, n_radii: int, n_angles: int, harmonics: int) -> Tensor:
    """The linear map from a patch's values to its rings' angular harmonics, ``(inputs, R·2·(M+1))`` in float64.

    Each ring samples ``n_angles`` points bilinearly; of each ring the (cos, sin) parts of harmonics 0..M. Sampling
    and harmonics are both linear, so they are one matrix: one dense matmul, which exports to a plain MatMul and
    runs at the machine's matmul speed, where gathering four corners per sample ran several times slower. The
    inputs are either the pixels or, with ``spectral``, the half spectrum ``InvariantFeatures._spectral`` computes
    (the columns of non-negative x-frequency; a sample in the other half reads its mirror image, which holds the
    same magnitude), both row-major.
    """
    h, w = patch
    radii = (torch.arange(n_radii, dtype=torch.float64) + 0.5) * (min(h, w) / 2 / n_radii)
    theta = torch.arange(n_angles, dtype=torch.float64) * (2 * math.pi / n_angles)
    centre = (h // 2, w // 2) if spectral else ((h - 1) / 2, (w - 1) / 2)
    ys = (centre[0] + radii[:, None] * torch.sin(theta)[None]).reshape(-1)
    xs = (centre[1] + radii[:, None] * torch.cos(theta)[None]).reshape(-1)
    if spectral:
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
    corners = [(y0, x0, (1 - fy) * (1 - fx)), (y0, x1, (1 - fy) * fx), (y1, x0, fy * (1 - fx)), (y1, x1, fy * fx)]
    m = torch.arange(harmonics + 1, dtype=torch.float64)
    trig = torch.stack([torch.cos(torch.outer(theta, m)), torch.sin(torch.outer(theta, m))], dim=1)  # (T, 2, M+1)
    n_in = (w // 2 + 1) * h if spectral else h * w
    out = torch.zeros(n_in, n_radii, n_angles, dtype=torch.float64)
    ring = torch.arange(n_radii).repeat_interleave(n_angles)
    angle = torch.arange(n_angles).repeat(n_radii)
    for yy, xx, weight in corners:
        if spectral:
            fq_y, fq_x = yy - h // 2, xx - w // 2  # the sample's frequencies
            mirror = (fq_x < 0) & ~((w % 2 == 0) & (fq_x == -(w // 2)))  # read at (-fy, -fx) instead
            col = torch.where(mirror, -fq_x, fq_x.abs())
            row = torch.where(mirror, (-fq_y + h // 2) % h, yy)
            index = row * (w // 2 + 1) + col
        else:
            index = yy * w + xx
        out.index_put_((index, ring, angle), weight, accumulate=True)
    return torch.einsum("irt,tcm->ircm", out, trig).reshape(n_in, -1)


class InvariantFeatures(nn.Module):
    r"""Features of a patch that the model's own transforms leave unchanged, as fixed linear maps (exportable).

    * translation on: the magnitude of the 2-D discrete Fourier transform (centred), which a shift does not change —
      computed as matmuls with fixed cosine and sine matrices, so ONNX and TorchScript see plain MatMul/Sqrt;
    * rotation on: those values (or the pixels) sampled bilinearly on rings about the centre, and of each ring the
      magnitudes of its first angular harmonics :math:`|\sum_\theta f(r,\theta) e^{-im\theta}|`, which a rotation
      about the centre does not change;
    * both off: the pixels;
    * with ``moments`` > 0 and any invariance on, also the patch's own intensity distribution: its mean, standard
      deviation, skewness, kurtosis, minimum and maximum (the first ``moments`` of them); with ``quantiles`` > 0 its
      sorted pixel values at that many evenly spaced ranks. No rearrangement of the pixels — so no rotation or
      shift — changes either.

    ``½·log1p(|·|²)`` compresses the spectrum's range (the log of the magnitude for large values, with no square root
    whose slope at 0 would turn float rounding into export-parity errors); per-feature ``mean``/``scale`` buffers
    (set from the training patches by ``calibrate``, saved with the weights) standardise them.

    Why the class head reads these and not the pixels: an MLP on pixels must learn from examples that a rotated or
    shifted suit is the same suit, and on atom-centred or grid patches the same freedom lets the class split by
    sublattice or registration; here it cannot.

    Why the intensity moments: the spectrum is taken of the mean-free patch and the ring harmonics keep only
    magnitudes, so how bright a patch is — what tells a heavier cation's film from its substrate in Z-contrast —
    reaches those features only indirectly (docs/training.md has the measurements). Quantiles carry the same and came
    first, but sorting every patch took more than half of the exported encoder's time.

    Why the formulation: the spectrum's two transforms are two large matmuls over the whole batch, and ring
    sampling with the angular harmonics is one fixed matrix (``_ring_harmonics``), so ONNX Runtime and TorchScript
    run the features at matmul speed; gathering four corners per ring sample, and a batch of 32×32 matmuls per
    patch, made them several times the encoder trunk's cost.
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
        moments: int = 0,
    ) -> None:
        super().__init__()
        h, w = patch
        if not 0 <= moments <= len(_MOMENTS):
            raise ValueError(f"moments={moments}: the intensity moments are {', '.join(_MOMENTS)} (0 to 6 of them)")
        self.rotation, self.translation = rotation, translation
        self.quantiles = quantiles if (rotation or translation) else 0
        self.moments = moments if (rotation or translation) else 0
        ranks = torch.linspace(0, h * w - 1, self.quantiles, dtype=torch.float64).round().long()
        self.register_buffer("quantile_ranks", ranks, persistent=False)
        # With rotation, the spectrum is only read on the rings, and the spectrum of a real patch is symmetric
        # (|F(k)| = |F(-k)|): the columns of non-negative x-frequency (w // 2 + 1 of them) hold every value needed.
        self.half = w // 2 + 1 if rotation else w
        if translation:
            ky = (torch.arange(h, dtype=torch.float64) - h // 2) % h  # fftshift: row i holds frequency i - h // 2
            ay = 2 * math.pi * torch.outer(ky, torch.arange(h, dtype=torch.float64)) / h
            kx = torch.arange(self.half, dtype=torch.float64) if rotation else (torch.arange(w) - w // 2) % w
            ax = 2 * math.pi * torch.outer(kx.double(), torch.arange(w, dtype=torch.float64)) / w
            # Along x, one matmul of all (B·H, W) rows with [cos | sin]; along y, [cos; sin] times each patch's
            # (H, 2X) result — two matmuls for the whole batch, and no transpose between them.
            self.register_buffer("dft_x", torch.cat([torch.cos(ax), torch.sin(ax)]).t().float(), persistent=False)
            self.register_buffer("dft_y", torch.cat([torch.cos(ay), torch.sin(ay)]).float(), persistent=False)
        n_features = h * w
        if rotation:
            self.n_radii = max(2, min(h, w) // 2)
            self.harmonics = harmonics
            rings = _ring_harmonics((h, w), translation, self.n_radii, n_angles, harmonics)
            self.register_buffer("rings", rings.float(), persistent=False)
            n_features = self.n_radii * (harmonics + 1)
        self.n_features = n_features + self.moments + self.quantiles
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("scale", torch.ones(self.n_features))

    def raw(self, x: Tensor) -> Tensor:
        """Unstandardised features ``(B, F)`` of patches ``(B, 1, H, W)``."""
        parts = [self._spectral(x[:, 0])]
        flat = x.reshape(x.shape[0], -1)
        if self.moments:
            parts.append(_intensity_moments(flat, self.moments))
        if self.quantiles:
            parts.append(torch.sort(flat, dim=1).values[:, self.quantile_ranks])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _spectral(self, f: Tensor) -> Tensor:
        b, h, w = f.shape
        if self.translation:
            f = f - f.mean(dim=(-2, -1), keepdim=True)
            x_parts = (f.reshape(b * h, w) @ self.dft_x).reshape(b, h, 2 * self.half)  # [cos | sin] along x
            yx = self.dft_y @ x_parts  # (B, 2H, 2X): [cos; sin] along y of each
            n, m = h, self.half
            re = yx[:, :n, :m] - yx[:, n:, m:]  # cos·cos - sin·sin
            im = yx[:, :n, m:] + yx[:, n:, :m]  # (the sign of Im does not matter)
            f = 0.5 * torch.log1p(re * re + im * im)  # log of the magnitude, with no sqrt to amplify rounding near 0
        flat = f.reshape(b, -1)
        if not self.rotation:
            return flat
        return self.ring_magnitudes(flat @ self.rings)

    def ring_magnitudes(self, harmonics: Tensor) -> Tensor:
        """``(B, F)`` features from ``(B, R·2·(M+1))`` ring harmonics (``rings``' product): each ring's [cos | sin]
        parts of harmonics 0..M to the log of their magnitudes."""
        b, k = harmonics.shape[0], self.harmonics + 1
        parts = harmonics.reshape(b, self.n_radii, 2 * k)
        c, s = parts[..., :k], parts[..., k:]
        return 0.5 * torch.log1p(c * c + s * s).reshape(b, -1)

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
        moments: int = 0,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        self.features = InvariantFeatures(
            patch, rotation=rotation, translation=translation, quantiles=quantiles, moments=moments
        )
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
    on the input instead of the trunk when ``invariant_class`` (``ModelConfig.class_head == "invariant"``), whose
    features ignore rotations when ``class_rotation`` (None: as the model's ``rotation``)."""

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
        class_moments: int = 0,
        class_rotation: bool | None = None,
    ) -> None:
        branch = invariant_class and n_classes > 0
        self.heads = _Heads(width, latent_dim, 0 if branch else n_classes, rotation, translation)
        self.class_head = (
            InvariantClassHead(
                patch,
                n_classes=n_classes,
                rotation=rotation if class_rotation is None else class_rotation,
                translation=translation,
                quantiles=class_quantiles,
                moments=class_moments,
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
        class_moments: int = 0,
        class_rotation: bool | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = patch[0] * patch[1]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self._attach_heads(
            patch, width, latent_dim, n_classes, rotation, translation,
            invariant_class, class_quantiles, class_moments, class_rotation,
        )  # fmt: skip


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
        class_moments: int = 0,
        class_rotation: bool | None = None,
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
            patch, hidden, latent_dim, n_classes, rotation, translation,
            invariant_class, class_quantiles, class_moments, class_rotation,
        )  # fmt: skip


class _AutogradLikelihood(nn.Module):
    """``log_likelihood`` by plain autograd through the materialised logits: the dense and broadcast decoders always,
    the coordinate decoder off the CPU (where its fused kernel is not used, ``models.likelihood_path``).

    ``pointwise``: whether the decoder draws any list of coordinates point by point (the coordinate MLP), so it can
    be evaluated at a few chosen points (``models.reconstruction`` redraws block centres); the dense and broadcast
    decoders draw the whole patch grid at once.
    """

    pointwise: bool = False

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

    pointwise = True

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
