"""The grid encoder as a function of the frame: every grid patch's outputs without cutting the patches out.

Why: on a grid whose stride is smaller than the patch, cutting writes every pixel many times (32-px patches at
stride 8: 16 times, 64 MB for one 1024² frame) before the encoder reads them all again. Everything the exported MLP
encoder computes from a patch's pixels *linearly* is a strided convolution over the frame — the trunk's first layer,
the redrawing's block means, the class head's Fourier transform — and a convolution reads the frame in cache-sized
tiles instead. What is not linear is computed per patch from those results exactly as the patch encoder does, with
two rewrites that are equal in exact arithmetic:

* the class head transforms the *mean-free* patch; the transform of the raw patch differs from it only at the zero
  frequency, which nothing reads here (its weight in the rings' matrix, or in the class layer, is zero);
* the intensity moments come from sums of the pixels' powers over each patch — box sums of the frame's running sums,
  in float64, where the conversion to central moments loses nothing a float32 two-pass computation keeps — and the
  minimum and maximum from max-pooling.

``FrameEncoder(wrapper, stride)(region)`` takes the frame region the grid covers, ``(1, 1, (gh-1)·sy + ph,
(gw-1)·sx + pw)`` normalised as the patch path normalises it, and returns the wrapper's outputs in its order for the
``gh·gw`` patches, row-major: the same tuple the patch encoder returns for ``tile_grid``'s patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.wrapper import InferenceWrapper
from models.nets import MLPEncoder, posterior_means

__all__ = ["FrameEncoder", "FrameEncoderError", "frame_encoder_for", "frame_region"]


class FrameEncoderError(ValueError):
    """A model whose encoder the frame formulation does not cover (it keeps the patch path)."""


def frame_region(frame: Tensor, patch: tuple[int, int], stride: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The part of a 2-D frame a ``grid`` of patches at origin (0, 0) covers, as ``(1, 1, h, w)``."""
    h = (grid[0] - 1) * stride[0] + patch[0]
    w = (grid[1] - 1) * stride[1] + patch[1]
    return frame[:h, :w].reshape(1, 1, h, w)


class FrameEncoder(nn.Module):
    """The wrapper's encoder on every grid patch of a frame region (see the module docstring). Shares the wrapper's
    parameters: build it after training, as the exporter does."""

    def __init__(self, wrapper: InferenceWrapper, stride: tuple[int, int]) -> None:
        super().__init__()
        encoder = wrapper.encoder
        if not isinstance(encoder, MLPEncoder):
            raise FrameEncoderError(f"the frame encoder needs the MLP encoder, not {type(encoder).__name__}")
        if wrapper.fp16:
            raise FrameEncoderError("the frame encoder is float32 only")
        head = encoder.class_head
        features = head.features if head is not None else None
        if features is not None and features.quantiles:
            raise FrameEncoderError("intensity quantiles need a sort of each patch: the patch path computes them")
        self.wrapper, self.patch, self.stride = wrapper, wrapper.patch, (int(stride[0]), int(stride[1]))
        ph, pw = self.patch
        first = encoder.trunk[1]
        kernels = [first.weight.detach()]
        self.n_hidden = int(first.out_features)
        redraw = wrapper.redraw
        self.n_redraw = 0
        if redraw is not None:
            values = redraw.blocks.t() if redraw.step > 1 else torch.eye(ph * pw, dtype=first.weight.dtype)
            kernels.append(values.to(first.weight.dtype))
            self.n_redraw = int(values.shape[0])
        self.n_linear_features = 0
        if features is not None and not features.translation:  # the pixels, or their rings: linear in the pixels
            linear = features.rings.t() if features.rotation else torch.eye(ph * pw, dtype=first.weight.dtype)
            kernels.append(linear.to(first.weight.dtype))
            self.n_linear_features = int(linear.shape[0])
        weight = torch.cat(kernels)
        bias = torch.cat([first.bias.detach(), weight.new_zeros(weight.shape[0] - self.n_hidden)])
        self.register_buffer("kernel", weight.reshape(-1, 1, ph, pw).contiguous(), persistent=False)
        self.register_buffer("kernel_bias", bias, persistent=False)
        self.rest = encoder.trunk[2:]
        self.heads = encoder.heads
        self.head = head
        self.features = features
        if features is not None and features.translation:
            half = features.half
            # along x: a 1×pw kernel sliding by sx over every row, two channels per frequency kx: (cos, sin)
            cos_x, sin_x = features.dft_x[:, :half].t(), features.dft_x[:, half:].t()  # (X, W) each
            along_x = torch.stack([cos_x, sin_x], dim=1).reshape(2 * half, 1, 1, pw)
            self.register_buffer("dft_x", along_x.contiguous(), persistent=False)
            # along y: each frequency kx on its own (groups), its (cos, sin) pair to the real and imaginary parts at
            # every ky — re = cos_y·cos_x − sin_y·sin_x, im = sin_y·cos_x + cos_y·sin_x — by a ph×1 kernel
            cos_y, sin_y = features.dft_y[:ph], features.dft_y[ph:]  # (H, H) each: rows ky, columns y
            re = torch.stack([cos_y, -sin_y], dim=1)  # (H, 2 inputs, H taps)
            im = torch.stack([sin_y, cos_y], dim=1)
            along_y = torch.cat([re, im]).unsqueeze(0).expand(half, -1, -1, -1)  # (X, 2H, 2, H)
            self.register_buffer("dft_y", along_y.reshape(half * 2 * ph, 2, ph, 1).contiguous(), persistent=False)
            if features.rotation:  # the rings' matrix with its rows in the (x, y) order of the channels
                rings = features.rings.reshape(ph, half, -1).permute(1, 0, 2).reshape(ph * half, -1)
                # the log's ½ moved into the class layer; the zero frequency read by nothing (the mean taken out)
                rings = 0.5 * rings.t()
                rings[:, self._zero_frequency()] = 0.0
                self.register_buffer("rings_xy", rings.contiguous(), persistent=False)
        if head is not None:
            self._fold_class_layer()

    def _zero_frequency(self) -> int:
        """The row of the zero frequency in the spectrum's channels, ``[x freq][y freq]`` (y fftshifted; x from 0 with
        rotation's half spectrum, fftshifted without it)."""
        assert self.features is not None
        ph, pw = self.patch
        return (0 if self.features.rotation else pw // 2) * ph + ph // 2

    def _fold_class_layer(self) -> None:
        """The class layer with the features' standardisation, the logs' ½ and the spectrum's channel order folded
        into its weights, so the features stay channel-major, as the convolutions wrote them (a transpose of every
        patch's features, and an elementwise pass each for the mask, the ½ and the standardisation, had cost more
        than the layer itself)."""
        features = self.features
        assert features is not None and self.head is not None
        layer = self.head.net[0]
        weight = layer.weight.detach().double() / features.scale.double()[None, :]
        bias = layer.bias.detach().double() - weight @ features.mean.double()
        n_spectral = features.n_features - features.moments
        spectral = weight[:, :n_spectral]
        if features.translation or features.rotation:  # ½·log1p(|·|²) of the spectrum or of the rings' harmonics
            spectral = 0.5 * spectral
        if features.translation and not features.rotation:  # the spectrum's rows [x][y]; the patch path's (y, x)
            ph, half = self.patch[0], features.half
            order = torch.arange(ph * half).reshape(ph, half).t().reshape(-1)
            spectral = spectral[:, order].clone()
            spectral[:, self._zero_frequency()] = 0.0  # its value here is the patch mean's, there 0
        weight = torch.cat([spectral, weight[:, n_spectral:]], dim=1)
        dtype = layer.weight.dtype
        self.register_buffer("class_weight", weight.to(dtype).contiguous(), persistent=False)
        self.register_buffer("class_bias", bias.to(dtype)[:, None].contiguous(), persistent=False)

    def forward(self, region: Tensor) -> tuple[Tensor, ...]:
        linear = F.conv2d(region, self.kernel, self.kernel_bias, stride=self.stride)  # (1, C, gh, gw)
        channels = linear.reshape(linear.shape[1], -1)  # (C, N): channel-major, as the convolution wrote it
        heads = self.heads.split(self._trunk(channels[: self.n_hidden]).t())
        if self.head is not None:
            heads["class_logits"] = self._class_logits(region, channels).t()
        latent = self.wrapper.latent
        out = posterior_means(
            heads, n_classes=latent.n_classes, rotation=latent.rotation, translation=latent.translation
        )
        redraw = self.wrapper.redraw
        if redraw is not None:
            values = channels[self.n_hidden : self.n_hidden + self.n_redraw].t()
            out.update(redraw.compare(heads, values.to(redraw.grid.dtype)))
        return tuple(out[name] for name in self.wrapper.output_names)

    def _trunk(self, h: Tensor) -> Tensor:
        """The trunk after its first layer and the heads' layer, on channel-major ``(C, N)`` activations: a
        transpose of every patch's 256 activations cost more than the matmuls (half the graph's time)."""
        for layer in self.rest:
            h = torch.addmm(layer.bias[:, None], layer.weight, h) if isinstance(layer, nn.Linear) else layer(h)
        return torch.addmm(self.heads.linear.bias[:, None], self.heads.linear.weight, h)

    def _class_logits(self, region: Tensor, channels: Tensor) -> Tensor:
        """``(K, N)`` class logits from channel-major features through the folded class layer."""
        assert self.head is not None
        hidden = torch.tanh(torch.addmm(self.class_bias, self.class_weight, self._class_features(region, channels)))
        last = self.head.net[2]
        return torch.addmm(last.bias[:, None], last.weight, hidden)

    def _class_features(self, region: Tensor, channels: Tensor) -> Tensor:
        """The class head's raw features, channel-major ``(F, N)``, less what ``_fold_class_layer`` moved into the
        layer (the logs' ½, the standardisation)."""
        features = self.features
        assert features is not None
        n = channels.shape[1]
        if features.translation:
            ph, half = self.patch[0], features.half
            along_x = F.conv2d(region, self.dft_x, stride=(1, self.stride[1]))  # (1, 2X, H, gw)
            along_y = F.conv2d(along_x, self.dft_y, stride=(self.stride[0], 1), groups=half)  # (1, X·2H, gh, gw)
            parts = along_y.reshape(half, 2, ph, n)  # [x freq][re, im][y freq][patch]
            spectrum = torch.log1p((parts * parts).sum(dim=1)).reshape(half * ph, n)
            spectral = (
                _ring_log_magnitudes(self.rings_xy @ spectrum, features.harmonics) if features.rotation else spectrum
            )
        else:
            start = self.n_hidden + self.n_redraw
            linear = channels[start : start + self.n_linear_features]
            spectral = _ring_log_magnitudes(linear, features.harmonics) if features.rotation else linear
        if not features.moments:
            return spectral
        return torch.cat([spectral, _frame_moments(region, self.patch, self.stride, features.moments)])


def _ring_log_magnitudes(harmonics: Tensor, n_harmonics: int) -> Tensor:
    """``InvariantFeatures.ring_magnitudes`` on channel-major ``(R·2·(M+1), N)`` ring harmonics, without the ½."""
    k = n_harmonics + 1
    parts = harmonics.reshape(-1, 2 * k, harmonics.shape[1])
    c, s = parts[:, :k], parts[:, k:]
    return torch.log1p(c * c + s * s).reshape(-1, harmonics.shape[1])


def _box_sums(power: Tensor, patch: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Sums of ``power`` (H, W, float64) over every grid patch, ``(gh·gw,)``, from its running sums."""
    (ph, pw), (sy, sx) = patch, stride
    c = F.pad(power, (1, 0, 1, 0)).cumsum(0).cumsum(1)
    total = c[ph::sy, pw::sx] - c[:-ph:sy, pw::sx] - c[ph::sy, :-pw:sx] + c[:-ph:sy, :-pw:sx]
    return total.reshape(-1)


def _box_max(region: Tensor, patch: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """The maximum of every grid patch, ``(1, gh·gw)``: along rows, then along columns (a maximum is separable, and
    two 1-D pools of ``p`` taps cost ``2p`` comparisons a patch where one 2-D pool costs ``p²``)."""
    rows = F.max_pool2d(region, (1, patch[1]), (1, stride[1]))
    return F.max_pool2d(rows, (patch[0], 1), (stride[0], 1)).reshape(1, -1)


def _frame_moments(region: Tensor, patch: tuple[int, int], stride: tuple[int, int], n: int) -> Tensor:
    """The patch path's ``models.nets._intensity_moments`` of every grid patch, channel-major ``(n, gh·gw)``, from
    the frame (see the module docstring): central moments from power sums in float64, extremes by max-pooling."""
    x = region[0, 0].to(torch.float64)
    count = float(patch[0] * patch[1])
    mean = _box_sums(x, patch, stride) / count
    out = [mean]
    if n > 1:
        s2 = _box_sums(x * x, patch, stride) / count
        var = (s2 - mean * mean).clamp_min(0.0)
        std = torch.sqrt(var + 1e-12)
        out.append(std)
        if n > 2:
            s3 = _box_sums(x * x * x, patch, stride) / count
            m3 = s3 - 3 * mean * s2 + 2 * mean * mean * mean
            out.append(m3 / (var * std + 1e-9))
        if n > 3:
            s4 = _box_sums(x * x * x * x, patch, stride) / count
            m4 = s4 - 4 * mean * s3 + 6 * mean * mean * s2 - 3 * mean * mean * mean * mean
            out.append(m4 / (var * var + 1e-9))
    moments = torch.stack(out).to(region.dtype)
    extremes = []
    if n > 4:
        extremes.append(-_box_max(-region, patch, stride))
    if n > 5:
        extremes.append(_box_max(region, patch, stride))
    return torch.cat([moments, *extremes]) if extremes else moments


def frame_encoder_for(wrapper: InferenceWrapper, stride: tuple[int, int]) -> FrameEncoder | None:
    """The wrapper's frame encoder, or None for a model the frame formulation does not cover."""
    try:
        return FrameEncoder(wrapper, stride).eval()
    except FrameEncoderError:
        return None
