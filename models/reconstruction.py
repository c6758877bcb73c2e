"""The patch as the model redraws it from its own posterior means — what the defect score reads from the decoder.

A defect is, by definition, what the model did not learn to draw: the encoder may still give it ordinary outputs
(a vacancy's z and class look like a neighbour's), but the decoder cannot reproduce it from them. So the exported
graph can also return, per patch, the negative log-likelihood of the patch under the decoder at the posterior means
of every latent — z, the angle, the shift, and the class as its probability vector q(y|x) — and the per-pixel
residual ``x − mean``; ``streamer.maps.novelty`` compares both with the patch's neighbours. Measured on the demo
lattice and the real MoS₂ scan (docs/real-data.md): the encoder's outputs alone rank the point defects at 0.83–0.97
ROC AUC, the larger of the redrawing's two calibrated scores at 0.98–0.999.

Why the class enters as its probabilities, not the most likely class: where two classes are nearly tied (an
interface, a model unsure of a patch) the argmax flips between neighbours and the redrawn patch jumps with it — a
clean patch scored 6.5× the threshold that way in a test. The decoder's first layer is linear in y, so the
probability vector moves the redrawing smoothly, and a confident patch is redrawn exactly as its class. Averaging the
likelihood over the K classes instead (the ELBO's term) ranked the demo's and MoS₂'s defects the same (ROC AUC
within 0.002 at four models) at K decoder passes instead of one.

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
        y = torch.softmax(heads["class_logits"].to(dtype), dim=-1) if self.n_classes > 0 else None
        unit = shift = None
        if self.rotation:
            c = heads["angle_loc"].to(dtype)
            unit = c / c.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.translation:
            shift = heads["shift_loc"].to(dtype)
        coords = rotate_shift_grid(self.grid, unit, shift)
        x = patches.to(dtype).reshape(patches.shape[0], -1)
        logits = self.decoder(coords, z, y).expand(*x.shape)  # (1, P) broadcast when nothing depends on the patch
        nll = -pixel_log_likelihood(logits, x, self.likelihood, self.gaussian_scale).sum(-1)
        return {"recon_nll": nll, "recon_residual": x - torch.sigmoid(logits)}
