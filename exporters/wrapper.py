"""The inference wrapper: a trained run's encoder network with named, fixed-order outputs and no Pyro.

At inference the guide's posterior means are deterministic functions of the encoder network's heads, computed by
``models.nets.posterior_means`` — the same function ``JTrVAE.encode`` calls, so serving and the model cannot drift.

The forward pass returns a *tuple* in ``streamer.maps.manifest.OUTPUT_ORDER`` (entries the model lacks are omitted),
because tuples survive tracing and ONNX export with their order intact; the names go into the manifest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.nets import posterior_means
from models.reconstruction import Redraw, redraw_step
from streamer.maps.manifest import LatentLayout, TensorSpec, expected_outputs

__all__ = ["InferenceWrapper", "ParityReference", "redraw_of"]


def _means(
    encoder: nn.Module, latent: LatentLayout, patches: Tensor, dtype: torch.dtype | None, redraw: Redraw | None
) -> dict[str, Tensor]:
    heads = encoder(patches)
    out = posterior_means(
        heads, n_classes=latent.n_classes, rotation=latent.rotation, translation=latent.translation, dtype=dtype
    )
    if redraw is not None:
        out.update(redraw(heads, patches))
    return out


class InferenceWrapper(nn.Module):
    """``patches (B, 1, ph, pw) float32 -> tuple of outputs`` (see the module docstring for the order).

    ``fp16=True`` runs the network in float16 (weights converted by the caller) but keeps the float32 interface
    and does the softmax and ``atan2`` in float32, where the ill-conditioned angle of a weak concentration is safest.
    ``redraw`` (when ``latent.reconstruction_pixels``) adds the decoder's redrawing of each patch for the defect score.
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent: LatentLayout,
        patch: tuple[int, int],
        *,
        fp16: bool = False,
        redraw: Redraw | None = None,
    ) -> None:
        super().__init__()
        if (redraw is not None) != bool(latent.reconstruction_pixels):
            raise ValueError("pass a Redraw exactly when latent.reconstruction_pixels is set")
        self.encoder = encoder
        self.latent = latent
        self.patch = patch
        self.fp16 = fp16
        self.redraw = redraw

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return expected_outputs(self.latent)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def forward(self, patches: Tensor) -> tuple[Tensor, ...]:
        x = patches.to(torch.float16) if self.fp16 else patches
        means = _means(self.encoder, self.latent, x, torch.float32 if self.fp16 else None, self.redraw)
        return tuple(means[name] for name in self.output_names)


class ParityReference:
    """The eager reference that exported outputs are checked against: the model's own network and posterior means.

    Run in the model's dtype (a run trained in float64 is checked in float64), so the comparison measures what
    tracing and export changed, not a cast.
    """

    def __init__(self, model: nn.Module, latent: LatentLayout) -> None:
        self.model = model
        self.latent = latent
        self.redraw = redraw_of(model) if latent.reconstruction_pixels else None

    @torch.no_grad()
    def __call__(self, patches: Tensor) -> dict[str, Tensor]:
        dtype = next(self.model.parameters()).dtype
        means = _means(self.model.encoder, self.latent, patches.to(dtype), None, self.redraw)
        return {s.name: means[s.name].detach().to("cpu", torch.float32) for s in expected_outputs(self.latent)}


def redraw_of(model: nn.Module) -> Redraw:
    """A ``Redraw`` on the model's own decoder (shared, not copied: the caller decides whether to copy the model),
    on the blocks ``redraw_step`` picks for its patch size — the same for calibration, export and parity."""
    cfg = model.cfg
    patch = (int(cfg.patch[0]), int(cfg.patch[1]))
    return Redraw(
        model.decoder,
        model.grid,
        patch=patch,
        step=redraw_step(patch),
        n_classes=cfg.n_classes,
        rotation=cfg.rotation,
        translation=cfg.translation,
        likelihood=cfg.likelihood,
        gaussian_scale=cfg.gaussian_scale,
    )
