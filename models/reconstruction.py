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

Why blocks of pixels: the decoder runs once per redrawn value, so on 32-px patches redrawing every pixel cost 16–30×
the encoder (``benchmarks/defect_score_cost.py``) and a CPU service publishing the default score fell far behind a
scan. A larger patch is redrawn on ``step``×``step`` blocks (about ``REDRAW_PIXELS`` of them a patch, so the cost
is the same at any patch size): each block's mean value against the decoder at the block's centre. Averaging, not
sampling every ``step``-th pixel: a sub-grid throws away the counts of the pixels it skips, and on the low-dose
MoS₂ scan it cut the dopants' ROC AUC from 0.996 to 0.79 (docs/real-data.md); a block mean keeps every pixel's
signal and averages its noise. A decoder that draws only the whole grid at once (dense, spatial broadcast) draws
every pixel and its means are averaged over the same blocks: the same values, at the cost of a full redrawing.

Pure torch (no Pyro) so it traces and exports with the encoder; the likelihood is the model's own
(``models.fused_likelihood.pixel_log_likelihood``), so "unlikely" means what it meant in training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.coords import rotate_shift_grid
from models.fused_likelihood import pixel_log_likelihood

__all__ = ["REDRAW_PIXELS", "Redraw", "redraw_blocks", "redraw_step", "redrawn_values"]

#: about how many values of each patch the defect score's redrawing scores (read when a ``Redraw`` is built, so a
#: benchmark can compare against every pixel)
REDRAW_PIXELS = 64


def redraw_step(patch: tuple[int, int], target: int | None = None) -> int:
    """The block side that leaves about ``target`` (default ``REDRAW_PIXELS``) blocks in a patch (1: every pixel)."""
    pixels = patch[0] * patch[1]
    return max(1, round(math.sqrt(pixels / (REDRAW_PIXELS if target is None else target))))


def redraw_blocks(patch: tuple[int, int], step: int) -> Tensor:
    """The ``(ph·pw, m)`` matrix whose column ``k`` averages block ``k`` (row-major) of a row-major patch: the
    ``step``×``step`` blocks that fit, the leftover rows and columns split evenly between the edges."""
    h, w = patch
    bh, bw = h // step, w // step
    if bh < 1 or bw < 1:
        raise ValueError(f"a {step}x{step} block does not fit a {h}x{w} patch")
    r0, c0 = (h - bh * step) // 2, (w - bw * step) // 2
    pixel = torch.arange(h * w).reshape(h, w)[r0 : r0 + bh * step, c0 : c0 + bw * step]
    block = torch.arange(bh * bw).reshape(bh, bw).repeat_interleave(step, 0).repeat_interleave(step, 1)
    out = torch.zeros(h * w, bh * bw, dtype=torch.float64)
    out[pixel.reshape(-1), block.reshape(-1)] = 1.0 / (step * step)
    return out


def redrawn_values(patch: tuple[int, int]) -> int:
    """How many values ``Redraw`` returns per patch (``recon_residual``'s width): the manifest records it."""
    step = redraw_step(patch)
    return patch[0] * patch[1] if step == 1 else (patch[0] // step) * (patch[1] // step)


class Redraw(nn.Module):
    """``(heads, patches) -> {"recon_nll": (B,), "recon_residual": (B, m)}`` for a trained decoder.

    ``grid`` is the model's pixel grid ``(P, 2)`` of ``patch``; with ``step`` > 1 the patch is redrawn on its ``m``
    blocks of ``step``×``step`` pixels (``redraw_blocks``): the block means against the decoder at the block
    centres, the log-likelihood summed over blocks and scaled by ``step²`` to stand for the whole patch. The decoder
    runs in the grid's dtype (float32 in an export) whatever the encoder's, because a sum of hundreds of per-pixel
    terms in float16 would lose the very differences the score looks for.
    """

    def __init__(
        self,
        decoder: nn.Module,
        grid: Tensor,
        *,
        patch: tuple[int, int],
        step: int = 1,
        n_classes: int,
        rotation: bool,
        translation: bool,
        likelihood: str,
        gaussian_scale: float,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        if grid.shape[0] != patch[0] * patch[1]:
            raise ValueError(f"grid has {grid.shape[0]} points, a {patch[0]}x{patch[1]} patch {patch[0] * patch[1]}")
        self.step = step
        self.pointwise = bool(getattr(decoder, "pointwise", False))
        if step > 1:
            blocks = redraw_blocks(patch, step)
            self.register_buffer("blocks", blocks.to(grid.dtype), persistent=False)
            if self.pointwise:
                grid = (blocks.t() @ grid.detach().to(torch.float64)).to(grid.dtype)  # the block centres
        self.pixels = int(self.blocks.shape[1]) if step > 1 else int(grid.shape[0])  # the values it returns
        self.register_buffer("grid", grid.detach().clone())
        self.n_classes, self.rotation, self.translation = n_classes, rotation, translation
        self.likelihood, self.gaussian_scale = likelihood, gaussian_scale

    def forward(self, heads: dict[str, Tensor], patches: Tensor) -> dict[str, Tensor]:
        x = patches.to(self.grid.dtype).reshape(patches.shape[0], -1)
        return self.compare(heads, x @ self.blocks if self.step > 1 else x)

    def compare(self, heads: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        """``forward`` on the values already redrawn-sized: ``(B, pixels)`` block means (or pixels, ``step`` 1) in
        the grid's dtype — what a frame encoder computes for every grid patch at once as a strided convolution."""
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
        logits = self.decoder(coords, z, y)
        if self.step > 1 and not self.pointwise:  # the whole grid was drawn: its block means, back to logits
            mean = torch.sigmoid(logits) @ self.blocks
            logits = torch.logit(mean.clamp(1e-6, 1 - 1e-6))
        logits = logits.expand(*x.shape)  # (1, m) broadcast when nothing depends on the patch
        nll = -pixel_log_likelihood(logits, x, self.likelihood, self.gaussian_scale).sum(-1) * (self.step**2)
        return {"recon_nll": nll, "recon_residual": x - torch.sigmoid(logits)}
