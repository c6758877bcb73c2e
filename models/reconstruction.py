"""The patch as the model redraws it from its own posterior means — what the defect score reads from the decoder.

A defect is, by definition, what the model did not learn to draw: the encoder may still give it ordinary outputs
(a vacancy's z and class look like a neighbour's), but the decoder cannot reproduce it from them. So the exported
graph can also return, per patch, the negative log-likelihood of the patch under the decoder at the posterior
means (mean z, mean angle, mean shift), averaged over the classes by their posterior probabilities — the ELBO's
reconstruction term — and the per-pixel residual ``x − E_q(y)[mean]``;
``streamer.maps.novelty`` compares both with the patch's neighbours. Measured on the demo lattice and the real MoS₂
scan (docs/real-data.md): the encoder's outputs alone rank the point defects at 0.83–0.97 ROC AUC, the larger of
the redrawing's two calibrated scores at 0.98–0.999.

Why the class average and not the most likely class: where two classes are nearly tied (an interface, a model
unsure of a patch) the argmax flips between neighbours and the redrawn patch jumps with it — a clean patch scored
6.5× the threshold that way in a test — while the average moves smoothly. It costs one decoder pass per class.

Pure torch (no Pyro) so it traces and exports with the encoder; the likelihood is the model's own
(``models.fused_likelihood.pixel_log_likelihood``), so "unlikely" means what it meant in training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.coords import rotate_shift_grid
from models.fused_likelihood import pixel_log_likelihood

__all__ = ["Redraw"]


class Redraw(nn.Module):
    """``(heads, patches) -> {"recon_nll": (B,), "recon_residual": (B, P)}`` for a trained decoder.

    ``grid`` is the model's pixel grid ``(P, 2)``; the decoder runs in the grid's dtype (float32 in an export) whatever
    the encoder's, because a sum of thousands of per-pixel terms in float16 would lose the very differences the score
    looks for.
    """

    def __init__(
        self,
        decoder: nn.Module,
        grid: Tensor,
        *,
        n_classes: int,
        rotation: bool,
        translation: bool,
        likelihood: str,
        gaussian_scale: float,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("grid", grid.detach().clone())
        self.n_classes, self.rotation, self.translation = n_classes, rotation, translation
        self.likelihood, self.gaussian_scale = likelihood, gaussian_scale

    def forward(self, heads: dict[str, Tensor], patches: Tensor) -> dict[str, Tensor]:
        dtype = self.grid.dtype
        z = heads["z_loc"].to(dtype)
        onehot = prob = None
        if self.n_classes > 0:
            prob = torch.softmax(heads["class_logits"].to(dtype), dim=-1).T[..., None]  # (K, B, 1)
            onehot = torch.eye(self.n_classes, dtype=dtype, device=z.device)[:, None, :]  # (K, 1, K): every class
        unit = shift = None
        if self.rotation:
            c = heads["angle_loc"].to(dtype)
            unit = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.translation:
            shift = heads["shift_loc"].to(dtype)
        coords = rotate_shift_grid(self.grid, unit, shift)
        x = patches.to(dtype).reshape(patches.shape[0], -1)
        logits = self.decoder(coords, z, onehot).expand(*(() if prob is None else (self.n_classes,)), *x.shape)
        nll = -pixel_log_likelihood(logits, x, self.likelihood, self.gaussian_scale).sum(-1, keepdim=True)
        mean = torch.sigmoid(logits)
        if prob is not None:  # (K, B, ·) → the posterior average over the classes
            nll, mean = (prob * nll).sum(0), (prob * mean).sum(0)
        return {"recon_nll": nll[:, 0], "recon_residual": x - mean}
