"""The coordinate decoder fused with its pixel log-likelihood: forward and backward in one cache-sized pass.

Why: training cost sits in the decoder MLP evaluated at K·B·P points (classes × images × pixels). Through autograd
every layer materialises a K·B·P×256 tensor several times (pre-activation, tanh, tanh', gradients) — hundreds of MB
per step that stream through memory and are page-faulted in afresh on each allocation; the matmuls end up waiting
on memory. The loss only needs ``log p(x_b | k, ...)`` summed over pixels, one number per (class, image) pair, and
its gradient reaches each pair as one scalar ``w[k, b]``. So while the pair's activations are still in cache we
run the backward for that pair with unit upstream gradient and keep only its *per-pair* parameter gradients
(H×H per layer: far smaller than P×H activations); the real backward is then a weighted sum over pairs. No
activation outlives its chunk, no work is repeated (same matmul count as autograd), and the class-independent part
of the first layer, ``W_c·X' + b_c``, is computed once per image rather than once per class.

Everything here is pure torch; ``CoordDecoder.log_likelihood`` is the entry point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CHUNK_ROWS",
    "MatmulPrecision",
    "coord_mlp_log_likelihood",
    "native_bfloat16",
    "pixel_log_likelihood",
    "resolve_matmul",
]

#: Default rows (pixels × pairs) per chunk: a few MB of activations per layer, small enough to stay in cache, large
#: enough for efficient matmuls and few thread barriers.
CHUNK_ROWS = 4608

#: The precision of the decoder's matmul operands: ``"full"`` is the training dtype; ``"bfloat16"`` rounds the hidden
#: activations, their gradients and the weights to bfloat16 for the matmuls (which accumulate in float32 inside
#: oneDNN). Parameters, the first layer, the logits' likelihood and every per-pair sum stay in the training dtype.
MatmulPrecision = Literal["full", "bfloat16"]
_MATMUL_DTYPES = {"bfloat16": torch.bfloat16}


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX through oneDNN).

    Without it oneDNN emulates bfloat16 and the matmuls get slower, not faster, so ``"auto"`` must not pick it.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: assume emulation
        return False


def resolve_matmul(asked: str, dtype: torch.dtype) -> MatmulPrecision:
    """``"auto"``: bfloat16 operands where the CPU has them natively and training runs in float32, else full."""
    if asked == "auto":
        return "bfloat16" if dtype == torch.float32 and native_bfloat16() else "full"
    if asked not in ("full", "bfloat16"):
        raise ValueError(f"decoder matmul precision {asked!r} is not one of auto, full, bfloat16")
    return asked  # type: ignore[return-value]


def pixel_log_likelihood(logits: Tensor, x: Tensor, likelihood: str, gaussian_scale: float) -> Tensor:
    """Per-pixel ``log p(x | logits)``: Bernoulli on the logits, or Normal(sigmoid(logits), gaussian_scale)."""
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    r = (x - torch.sigmoid(logits)) / gaussian_scale
    return -0.5 * r * r - math.log(gaussian_scale) - 0.5 * math.log(2 * math.pi)


def _ll_and_slope(logits: Tensor, x: Tensor, likelihood: str, sigma: float, need_slope: bool) -> tuple[Tensor, Tensor]:
    """Per-pixel log-likelihood and its derivative with respect to the logit."""
    if likelihood == "bernoulli":
        ll = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return ll, (x - torch.sigmoid(logits)) if need_slope else ll
    m = torch.sigmoid(logits)
    r = (x - m) / sigma
    ll = -0.5 * r * r - (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    return ll, (r / sigma * m * (1 - m)) if need_slope else ll


def _tanh_of_double_(a2: Tensor) -> Tensor:
    """``tanh(a)`` from ``a2 = 2a``, in place, as ``2·sigmoid(2a) − 1``.

    Same function (absolute difference below 2e-7 in float32), but ATen's CPU sigmoid is about 5× faster than its
    tanh, and the doubling is free: it is folded into the preceding matmul's ``alpha``/``beta``.
    """
    return a2.sigmoid_().mul_(2).sub_(1)


def _no_grad_call(fn: Callable[..., None], *args: int) -> None:
    """Run ``fn`` without autograd in a worker thread (grad mode is per thread; Function.forward's is off)."""
    with torch.no_grad():
        fn(*args)


def _tanh_backward_(grad: Tensor, out: Tensor) -> None:
    """``grad *= 1 - out²`` in one pass (``out`` is a tanh output): autograd's own fused kernel, in place."""
    torch.ops.aten.tanh_backward.grad_input(grad, out, grad_input=grad)


class _FusedCoordMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        need_grad: bool,
        threads: int,
        chunk_rows: int,
        mm_dtype: torch.dtype,
        likelihood: str,
        sigma: float,
        coords: Tensor,  # (Bc, P, 2), Bc in {1, B}
        latent: Tensor,  # (M, B, H0): first-layer latent part (z, y) incl. nothing else
        x: Tensor,  # (B, P)
        wc: Tensor,  # (H0, 2)
        bc: Tensor,  # (H0,)
        wo: Tensor,  # (1, HL)
        bo: Tensor,  # (1,)
        *hidden: Tensor,  # W1, b1, W2, b2, ...: (H_l, H_{l-1}), (H_l,)
    ) -> Tensor:
        m_, b_, h0 = latent.shape
        p_ = x.shape[1]
        n_pairs = m_ * b_
        weights, biases = hidden[0::2], hidden[1::2]
        # The hidden layers' matmul operands, rounded once per call (no copy in full precision); the parameters
        # themselves, the first and the output layer, and every sum over pixels stay in the training dtype.
        weights = [w.to(mm_dtype) for w in weights]
        biases = [b.to(mm_dtype) for b in biases]
        lat2 = 2 * latent.reshape(n_pairs, h0)
        # Class-independent part of the first layer, once per image (or once, without transforms); pre-activations
        # are kept doubled for _tanh_of_double_.
        cpart = torch.addmm(bc, coords.reshape(-1, 2), wc.t(), beta=2, alpha=2).reshape(coords.shape[0], p_, h0)
        out = latent.new_empty(n_pairs)
        if need_grad:
            g_w = [w.new_empty(n_pairs, *w.shape) for w in weights]
            g_b = [latent.new_empty(n_pairs, w.shape[0]) for w in weights]
            g_wo = latent.new_empty(n_pairs, wo.shape[1])
            g_bo = latent.new_empty(n_pairs)
            g_lat = latent.new_empty(n_pairs, h0)
            g_wc = latent.new_empty(n_pairs, h0, 2)
            g_xy = latent.new_empty(n_pairs, p_, 2)
        per_chunk = max(1, chunk_rows // p_)

        def run(m: int, b0: int) -> None:
            b1 = min(b_, b0 + per_chunk)
            i0, i1, g = m * b_ + b0, m * b_ + b1, b1 - b0
            cp = cpart[b0:b1] if coords.shape[0] > 1 else cpart
            h = _tanh_of_double_(torch.add(cp, lat2[i0:i1, None, :])).reshape(g * p_, h0)
            # hs: activations in the training dtype (tanh' and the likelihood read them); hm: the same rounded to the
            # matmul dtype (the very same tensors in full precision). tanh' from a bfloat16 h would be 1 - h² of an h
            # with 8 bits, which is 0 for every |h| > 0.998: saturated units would lose their gradient, a bias.
            hs, hm = [h], [h.to(mm_dtype)]
            for w, b in zip(weights, biases, strict=True):
                h = _tanh_of_double_(torch.addmm(b, hm[-1], w.t(), beta=2, alpha=2).to(latent.dtype))
                hs.append(h)
                hm.append(h.to(mm_dtype))
            logits = torch.addmm(bo, hs[-1], wo.t()).reshape(g, p_)
            ll, slope = _ll_and_slope(logits, x[b0:b1], likelihood, sigma, need_grad)
            torch.sum(ll, dim=1, out=out[i0:i1])
            if not need_grad:
                return
            # Backward of this chunk with unit upstream gradient per pair; parameter gradients kept per pair.
            torch.bmm(slope.unsqueeze(1), hs[-1].reshape(g, p_, -1), out=g_wo[i0:i1].unsqueeze(1))
            torch.sum(slope, dim=1, out=g_bo[i0:i1])
            grad = torch.outer(slope.reshape(-1), wo[0])  # dL/dh_last, (g·P, HL)
            for layer in range(len(weights) - 1, -1, -1):
                _tanh_backward_(grad, hs[layer + 1])
                torch.sum(grad.reshape(g, p_, -1), dim=1, out=g_b[layer][i0:i1])
                grad_mm = grad.to(mm_dtype)
                ga = grad_mm.reshape(g, p_, -1)
                torch.bmm(ga.transpose(1, 2), hm[layer].reshape(g, p_, -1), out=g_w[layer][i0:i1])
                grad = (grad_mm @ weights[layer]).to(latent.dtype)
            _tanh_backward_(grad, hs[0])
            ga = grad.reshape(g, p_, h0)
            torch.sum(ga, dim=1, out=g_lat[i0:i1])
            xy = coords[b0:b1] if coords.shape[0] > 1 else coords.expand(g, p_, 2)
            torch.bmm(ga.transpose(1, 2), xy, out=g_wc[i0:i1])
            torch.matmul(ga, wc, out=g_xy[i0:i1])

        # Chunks never straddle two classes, so each one reads a contiguous slice of images: no gathers. They write
        # disjoint slices, so on CPU they can run side by side, one chunk per thread (see coord_mlp_log_likelihood).
        chunks = [(m, b0) for m in range(m_) for b0 in range(0, b_, per_chunk)]
        if threads > 1 and len(chunks) > 1 and latent.device.type == "cpu":
            with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
                list(pool.map(lambda c: _no_grad_call(run, *c), chunks))
        else:
            for c in chunks:
                run(*c)
        if need_grad:
            ctx.save_for_backward(*g_w, *g_b, g_wo, g_bo, g_lat, g_wc, g_xy)
            ctx.meta = (m_, b_, p_, coords.shape[0], len(weights))
        return out.reshape(m_, b_)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        m_, b_, p_, bc_, n_layers = ctx.meta
        saved = ctx.saved_tensors
        g_w, g_b = saved[:n_layers], saved[n_layers : 2 * n_layers]
        g_wo, g_bo, g_lat, g_wc, g_xy = saved[2 * n_layers :]
        w = grad_out.reshape(-1)
        g_coords = (w[:, None, None] * g_xy).reshape(m_, b_, p_, 2).sum(0)
        if bc_ == 1:
            g_coords = g_coords.sum(0, keepdim=True)
        g_latent = (w[:, None] * g_lat).reshape(m_, b_, -1)
        hidden_grads: list[Tensor] = []
        for gw, gb in zip(g_w, g_b, strict=True):
            hidden_grads += [(w @ gw.reshape(w.shape[0], -1).to(w.dtype)).reshape(gw.shape[1:]), w @ gb]
        return (
            None,
            None,
            None,
            None,
            None,
            None,
            g_coords,
            g_latent,
            None,
            (w @ g_wc.reshape(w.shape[0], -1)).reshape(g_wc.shape[1:]),
            w @ g_lat,
            (w @ g_wo).unsqueeze(0),
            (w @ g_bo).reshape(1),
            *hidden_grads,
        )


def coord_mlp_log_likelihood(
    coords: Tensor,
    latent: Tensor,
    x: Tensor,
    *,
    coord_weight: Tensor,
    coord_bias: Tensor,
    hidden: list[tuple[Tensor, Tensor]],
    out_weight: Tensor,
    out_bias: Tensor,
    likelihood: str,
    gaussian_scale: float,
    threads: int = 1,
    chunk_rows: int = CHUNK_ROWS,
    matmul: MatmulPrecision = "full",
) -> Tensor:
    """``Σ_p log p(x[b, p] | MLP(tanh(W_c·coords[b, p] + b_c + latent[..., b, :])))``, shape ``(..., B)``.

    ``coords`` ``(Bc, P, 2)`` with ``Bc`` 1 or B, ``latent`` broadcastable to ``(..., B, H0)`` (the first layer's
    latent part), ``x`` ``(B, P)``. Gradients reach every tensor argument except ``x``.

    The work is cut into chunks of about ``chunk_rows`` rows (pixels × pairs). ``threads=1`` runs them one after
    another on the calling thread, each op using torch's intra-op threads as the process has them. ``threads > 1``
    runs them side by side on that many CPU threads; that is fastest when each op is single-threaded (no barrier
    after every small op, which is what makes fine-grained intra-op threading slow on a busy machine), so pair it
    with one intra-op thread — a process-wide setting this function leaves to its caller (the CLI's
    ``training_threads``).

    ``matmul="bfloat16"`` runs the hidden layers' matmuls on bfloat16 operands (activations and gradients stay in
    the training dtype between them): on a CPU with native bfloat16 a step with 256-wide layers takes about 0.6× the
    time (64-wide ones are too small to gain), and its gradients differ from float64 by about 0.3 % (relative norm;
    the log-likelihood by 3e-5). It is not the default: at equal epochs the held-out ELBO came out worse
    (docs/training.md).
    """
    if threads < 1 or chunk_rows < 1:
        raise ValueError(f"threads={threads} and chunk_rows={chunk_rows} must both be at least 1")
    b_, p_ = x.shape
    lead = latent.shape[:-2]
    lat = latent.expand(*lead, b_, latent.shape[-1]).reshape(-1, b_, latent.shape[-1])
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)
    coords = coords.reshape(-1, p_, 2)
    params = [coord_weight, coord_bias, out_weight, out_bias, *[t for pair in hidden for t in pair]]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (coords, lat, *params))
    out = _FusedCoordMLP.apply(
        need_grad,
        threads,
        chunk_rows,
        _MATMUL_DTYPES.get(matmul, lat.dtype),
        likelihood,
        float(gaussian_scale),
        coords,
        lat,
        x,
        *params,
    )
    return out.reshape(*lead, b_)
