"""The inference wrapper: a trained run's encoder network with named, fixed-order outputs and no Pyro.

At inference the guide's posterior means are deterministic functions of the encoder network's heads, so serving
needs only the network and a few tensor operations:

* ``class_logits`` — the head's logits of q(y|x); ``class_prob = softmax(class_logits)``;
* ``z_loc``, ``z_scale`` — loc and scale of q(z|x) (the mean of z is its loc);
* ``angle`` — the mean direction of the projected-normal q(γ|x): ``atan2`` of its concentration vector
  ``(c_x, c_y)`` = ``(cos, sin)`` direction (``models.coords`` convention), in radians, in (-π, π];
* ``shift`` — the loc of q(s|x), ``(s_x, s_y)``.

The forward pass returns a *tuple* in ``streamer.manifest.OUTPUT_ORDER`` (entries the model lacks are omitted),
because tuples survive tracing and ONNX export with their order intact; the names go into the manifest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamer.manifest import LatentLayout, TensorSpec, expected_outputs

__all__ = ["InferenceWrapper", "ParityReference"]

#: output name -> key of ``JTrVAE.encode``'s dict
_FROM_ENCODE = {"class_prob": "class_prob", "z_loc": "z", "z_scale": "z_scale", "angle": "angle", "shift": "shift"}


class InferenceWrapper(nn.Module):
    """``patches (B, 1, ph, pw) float32 -> tuple of outputs`` (see the module docstring for the order).

    ``fp16=True`` runs the network in float16 (weights converted by the caller) but keeps the float32 interface
    and does the softmax and ``atan2`` in float32, where the ill-conditioned angle of a weak concentration is safest.
    """

    def __init__(self, encoder: nn.Module, latent: LatentLayout, patch: tuple[int, int], *, fp16: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.latent = latent
        self.patch = patch
        self.fp16 = fp16

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return expected_outputs(self.latent)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def forward(self, patches: Tensor) -> tuple[Tensor, ...]:
        x = patches.to(torch.float16) if self.fp16 else patches
        heads = self.encoder(x)
        out: list[Tensor] = []
        if self.latent.n_classes > 0:
            logits = heads["class_logits"].to(torch.float32)
            out += [logits, torch.softmax(logits, dim=-1)]
        out += [heads["z_loc"].to(torch.float32), heads["z_scale"].to(torch.float32)]
        if self.latent.rotation:
            c = heads["angle_loc"].to(torch.float32)
            out.append(torch.atan2(c[:, 1], c[:, 0]))
        if self.latent.translation:
            out.append(heads["shift_loc"].to(torch.float32))
        return tuple(out)


class ParityReference:
    """The eager reference that exported outputs are checked against: ``JTrVAE.encode`` (the guide's means).

    ``encode`` has no logits, so ``class_logits`` is checked against the eager encoder network's head.
    """

    def __init__(self, model: nn.Module, latent: LatentLayout) -> None:
        self.model = model
        self.latent = latent

    @torch.no_grad()
    def __call__(self, patches: Tensor) -> dict[str, Tensor]:
        names = [s.name for s in expected_outputs(self.latent)]
        dtype = next(self.model.parameters()).dtype  # a run trained in float64 is checked in float64
        patches = patches.to(dtype)
        encoded = self.model.encode(patches)
        out: dict[str, Tensor] = {}
        for name in names:
            if name == "class_logits":
                out[name] = self.model.encoder(patches)["class_logits"]
            else:
                out[name] = encoded[_FROM_ENCODE[name]]
        return {k: v.detach().to("cpu", torch.float32) for k, v in out.items()}
