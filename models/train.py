"""Training: SVI with exact parallel enumeration of the class, the paper's β annealing, checkpoints and resume.

``fit`` is the one entry point that touches Pyro's global state (param store, RNG): it clears and seeds it, so two
calls with the same config and data give the same model whatever ran before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.elbo import ELBO
from pyro.optim import Adam
from torch import Tensor

from models.checkpoint import (
    CheckpointError,
    load_config,
    load_last_weights,
    load_run,
    load_training_state,
    save_run,
)
from models.config import ModelConfig, RunConfig, TrainConfig
from models.deadline import Deadline
from models.evaluate import diagnose_classes, normalized_mutual_info
from models.fused_likelihood import resolve_matmul
from models.jtrvae import JTrVAE
from models.shards import SingleProcess
from models.warm_start import cluster_classes

__all__ = [
    "FitError",
    "TrainResult",
    "evaluate_loss",
    "fit",
    "invariant_features",
    "make_elbo",
    "resolve_device",
    "split_validation",
    "with_training_settings",
]


class FitError(ValueError):
    """Training input that does not fit the config; the message names the value and the fix."""


@dataclass
class TrainResult:
    model: JTrVAE
    history: list[dict]  # per epoch: epoch (0-based), loss, val_loss (None without validation), beta1..3, seconds
    diagnosis: dict | None = None  # models.evaluate.ClassDiagnosis.to_dict() on the training patches (K > 1)
    epochs: int = 0  # the epochs the run has in all (a deadline may have re-planned cfg.train.epochs)
    kept_epoch: int | None = None  # train.keep "best_val": the (0-based) epoch whose weights the model holds


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FitError("device 'cuda' was asked for but CUDA is not available; use device 'auto' or 'cpu'")
    return torch.device(device)


def make_elbo(model: JTrVAE) -> ELBO:
    """TraceEnum_ELBO (exact sum over the enumerated class) when the model has classes, plain Trace_ELBO otherwise."""
    if model.cfg.n_classes > 0:
        return TraceEnum_ELBO(max_plate_nesting=1)
    return Trace_ELBO(max_plate_nesting=1)


def _as_images(images: np.ndarray | Tensor, patch: tuple[int, int], what: str) -> Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) != tuple(patch):
        raise FitError(
            f"{what} have shape {tuple(x.shape)}; expected N×{patch[0]}×{patch[1]} (or N×1×H×W) to match "
            f"model.patch={tuple(patch)} — cut patches of that size or change the config"
        )
    if x.shape[0] == 0:
        raise FitError(f"{what} are empty; give at least one image")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise FitError(f"{what} must be finite and scaled to [0, 1]; normalise them first (streamer.maps.preprocess)")
    return x


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) index split; the validation set gets ``round(fraction·n)`` images (≥1 if >0)."""
    n_val = 0 if fraction <= 0 else max(1, round(fraction * n))
    if n_val >= n:
        raise FitError(f"val_fraction={fraction} leaves no training images out of {n}; lower it or add data")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def with_training_settings(model: JTrVAE, tc: TrainConfig) -> JTrVAE:
    """``model`` with the training settings ``JTrVAE`` does not read from its config (likelihood threads and matmul
    precision, pixel share): ``fit`` and the budget planner's timed steps both go through here, so the step timed
    is the step trained (the planner once timed one thread and used half its budget)."""
    model.likelihood_threads = tc.likelihood_threads
    model.likelihood_matmul = resolve_matmul(tc.decoder_matmul, getattr(torch, tc.dtype))
    model.pixel_fraction = tc.pixel_fraction
    return model


def _snapshot(model: JTrVAE) -> dict[str, Tensor]:
    """A copy of the weights as they are now (``keep = "best_val"``'s candidates, and the last epoch's for a resume)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate_loss(
    model: JTrVAE,
    images: np.ndarray | Tensor,
    *,
    beta: tuple[float, float, float] = (1.0, 1.0, 1.0),
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Mean negative ELBO per image, one Monte Carlo draw per image, weights untouched.

    No optimiser is involved (the published reference steps its optimiser here, which trains on the test set).
    The draws use their own ``seed`` inside a forked RNG, so the number is comparable across epochs and calling
    this does not change the random stream of the training around it.
    """
    p = next(model.parameters())
    x = _as_images(images, model.cfg.patch, "images").to(device=p.device, dtype=p.dtype)
    elbo = make_elbo(model)
    devices = [p.device] if p.device.type == "cuda" else []
    total = 0.0
    was_training = model.training
    model.eval()  # every pixel scored, whatever the training's pixel_fraction
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, x.shape[0], batch_size):
                total += float(elbo.loss(model.model, model.guide, x[start : start + batch_size], beta))
    finally:
        model.train(was_training)
    return total / x.shape[0]


def _check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    saved = load_config(run_dir)
    unnamed = {"class_names": None}  # names are set after training (atomstream train matches them to labels)
    if saved.model.model_copy(update=unnamed) != cfg.model.model_copy(update=unnamed):
        raise CheckpointError(
            f"cannot resume {run_dir}: its model config differs from the one given; resume with the saved config "
            "(config.json) or train into a new directory"
        )


def fit(
    cfg: RunConfig,
    images: np.ndarray | Tensor,
    out_dir: str | Path | None,
    *,
    val_images: np.ndarray | Tensor | None = None,
    resume: bool = False,
    steps: SingleProcess | None = None,
    deadline: Deadline | None = None,
) -> TrainResult:
    """Train the model ``cfg.model`` on ``images`` (N×H×W in [0, 1]) for ``cfg.train.epochs`` epochs.

    Without ``val_images`` a seeded ``cfg.train.val_fraction`` of ``images`` is held out for the per-epoch
    validation loss. ``out_dir=None`` writes nothing; otherwise the run directory (``models.checkpoint``) is written
    every ``checkpoint_every`` epochs and at the end. ``resume=True`` continues the run in ``out_dir`` from its last
    finished epoch with its weights, optimiser state and history, up to ``cfg.train.epochs`` in total.
    ``steps`` spreads each step over shards or processes (``models.shards``; ``models.distributed`` runs ranks).
    ``deadline`` (one process only: ranks would re-plan apart) re-plans ``cfg.train.epochs`` after each epoch so that
    the epochs end by it (``models.deadline``); the result's ``epochs`` and the saved config say what was trained.
    The result's model is in eval mode on the CPU, whichever device trained it; with ``train.keep = "best_val"`` it
    holds the weights of the post-ramp epoch with the lowest held-out loss (``kept_epoch``), the history all epochs.
    """
    steps = steps or SingleProcess()
    if deadline is not None and steps.world_size > 1:
        raise FitError("a deadline re-plans the epochs in each process on its own clock: give ranks fixed epochs")
    tc = cfg.train
    device = resolve_device(tc.device)
    dtype = torch.float64 if tc.dtype == "float64" else torch.float32
    x_all = _as_images(images, cfg.model.patch, "images")
    if val_images is not None:
        x_train, x_val = x_all, _as_images(val_images, cfg.model.patch, "val_images")
    elif tc.val_fraction > 0:
        tr, va = split_validation(x_all.shape[0], tc.val_fraction, tc.seed)
        x_train, x_val = x_all[tr], x_all[va]
    else:
        x_train, x_val = x_all, None
    if tc.keep == "best_val" and x_val is None:
        raise FitError("train.keep 'best_val' needs held-out patches: give val_fraction > 0 (or val_images)")
    x_train = x_train.to(device=device, dtype=dtype)

    pyro.clear_param_store()
    pyro.set_rng_seed(tc.seed)
    start_epoch, history, opt_state = 0, [], None
    best: tuple[float, int, dict[str, Tensor]] | None = None  # train.keep "best_val": (val loss, epoch, weights)
    if resume:
        if out_dir is None:
            raise FitError("resume=True needs out_dir, the run directory to continue")
        _check_resumable(Path(out_dir), cfg)
        model, _ = load_run(out_dir, device=str(device))
        model = model.to(dtype=dtype).train()
        state = load_training_state(out_dir, device=str(device))
        start_epoch, history, opt_state = state.epoch, list(state.history), state.optimizer
        last = load_last_weights(out_dir, device=str(device))
        if state.kept_epoch is not None and tc.keep == "best_val":
            # the kept epoch stays a candidate: the resumed run keeps the best of all its epochs, not of the new ones
            val = next((r["val_loss"] for r in history if r["epoch"] == state.kept_epoch), None)
            if val is not None:
                best = (float(val), state.kept_epoch, _snapshot(model))
        if last is not None:  # model.pt holds a kept earlier epoch: continue from where training stopped
            model.load_state_dict(last)
        pyro.set_rng_seed(tc.seed + start_epoch)  # a fresh but reproducible stream for the continued epochs
    else:
        model = JTrVAE(cfg.model).to(device=device, dtype=dtype)
    with_training_settings(model, tc)

    anchor = None
    head = getattr(model.encoder, "class_head", None)
    features = None if resume or head is None else head.features.calibrate(model._flat(x_train))
    if not resume and cfg.model.n_classes > 1 and tc.class_init == "invariant_gmm":
        if features is None:  # a pixel class head: cluster in the invariant features all the same
            features = invariant_features(cfg.model, model._flat(x_train))
        init = cluster_classes(features.cpu().numpy(), cfg.model.n_classes, seed=tc.seed)
        anchor = torch.as_tensor(init.responsibilities, device=device, dtype=dtype)
        _fit_class_head(model, x_train, anchor, lr=tc.lr, batch_size=tc.batch_size, seed=tc.seed)
    anchor = steps.prepare(model, anchor, seed=tc.seed + start_epoch)

    optim = Adam({"lr": tc.lr})
    if opt_state is not None:
        # Adam's moments carry over; its learning rate is this run's: a saved state restores its own param groups,
        # so a resume at a lower lr (to fine-tune) otherwise ran silently at the old one
        for saved in opt_state.values():
            for group in saved.get("param_groups", []):
                group["lr"] = tc.lr
        optim.set_state(opt_state)
    elbo = make_elbo(model)

    def loss_fn(
        model_fn: Callable, guide_fn: Callable, x: Tensor, beta: tuple, target: Tensor | None, weight: float
    ) -> Tensor:
        loss = elbo.differentiable_loss(model_fn, guide_fn, x, beta)
        if target is not None and weight > 0:
            log_q = torch.log_softmax(model.encoder(model._flat(x))["class_logits"], dim=-1)
            loss = loss - weight * (target * log_q).sum()
        return loss

    svi = SVI(model.model, model.guide, optim, loss=steps.loss(loss_fn, model))

    out_dir = out_dir if steps.is_main else None  # one process writes the run (the others have read it to resume)
    n = x_train.shape[0]
    batch = steps.global_batch(tc.batch_size)
    steps_per_epoch = math.ceil(n / batch)
    bar = _progress(tc.epochs - start_epoch, steps_per_epoch, tc.progress and steps.is_main)
    epoch = start_epoch
    while epoch < tc.epochs:
        beta = tc.annealing.at(epoch, tc.epochs)
        f = _anchor_fraction(tc.annealing.ramp_fraction, epoch, tc.epochs)
        weight = tc.class_anchor_end + f * (tc.class_anchor - tc.class_anchor_end)
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(tc.seed * 100_003 + epoch))
        total = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            target = None if anchor is None else anchor[idx]
            total += float(svi.step(x_train[idx], beta, target, weight))
            if bar is not None:
                bar.update(1)
        loss = steps.total(total) / n
        if not math.isfinite(loss):
            raise FitError(f"the loss became {loss} in epoch {epoch}; lower train.lr (now {tc.lr})")
        val_loss = None if x_val is None else evaluate_loss(model, x_val, beta=beta, batch_size=tc.batch_size)
        row = {
            "epoch": epoch,
            "loss": loss,
            "val_loss": val_loss,
            "beta1": beta[0],
            "beta2": beta[1],
            "beta3": beta[2],
            "class_anchor": weight,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        ramped = epoch >= tc.annealing.ramp_fraction * tc.epochs  # before, the loss is of another β: not comparable
        if tc.keep == "best_val" and val_loss is not None and ramped and (best is None or val_loss < best[0]):
            best = (val_loss, epoch, _snapshot(model))
        done = epoch + 1
        if deadline is not None:
            epochs = deadline.replan(done, tc.epochs, [r["seconds"] for r in history[start_epoch:]])
            if epochs != tc.epochs:
                tc = tc.model_copy(update={"epochs": epochs})
                cfg = cfg.model_copy(update={"train": tc})
                if bar is not None:
                    bar.total = (epochs - start_epoch) * steps_per_epoch
                    bar.refresh()
            row["planned_epochs"] = tc.epochs
        if bar is not None:
            bar.set_postfix(
                epoch=f"{epoch + 1}/{tc.epochs}",
                loss=f"{loss:.2f}",
                val=f"{val_loss:.2f}" if val_loss is not None else "-",
            )
        if out_dir is not None and tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.epochs:
            save_run(out_dir, model, cfg, epoch=done, history=history, optimizer_state=optim.get_state())
        epoch = done
    if bar is not None:
        bar.close()
    kept = best[1] if best is not None else None
    last_weights = None
    if best is not None and kept != epoch - 1:  # an earlier epoch won: keep it, and the last one for a resume
        last_weights = _snapshot(model)
        model.load_state_dict(best[2])
    model.eval()
    diagnosis = _diagnose(model, x_train, anchor, batch_size=max(tc.batch_size, 256))
    if out_dir is not None:
        save_run(
            out_dir,
            model,
            cfg,
            epoch=max(tc.epochs, start_epoch),
            history=history,
            optimizer_state=optim.get_state(),
            diagnosis=diagnosis,
            kept_epoch=kept,
            last_weights=last_weights,
        )
    # handed back on the CPU whatever trained it, as load_run gives a run: what follows a fit (encoding numpy
    # patches, calibration, export, plots) takes host data (the first GPU run's demo failed here with a CUDA model)
    model = model.to("cpu")
    return TrainResult(
        model=model, history=history, diagnosis=diagnosis, epochs=max(tc.epochs, start_epoch), kept_epoch=kept
    )


@torch.no_grad()
def _diagnose(model: JTrVAE, x: Tensor, anchor: Tensor | None, *, batch_size: int) -> dict | None:
    """The class diagnosis of the trained model on its training patches, and how far it moved from its start."""
    if model.cfg.n_classes < 2:
        return None
    chunks = [model.encoder(model._flat(x[i : i + batch_size]))["class_logits"] for i in range(0, len(x), batch_size)]
    prob = torch.softmax(torch.cat(chunks), -1).cpu().numpy()
    out = diagnose_classes(prob).to_dict()
    if anchor is not None:
        out["nmi_with_initial_clusters"] = normalized_mutual_info(prob.argmax(1), anchor.argmax(1).cpu().numpy())
    return out


@torch.no_grad()
def invariant_features(model_cfg: ModelConfig, x: Tensor) -> Tensor:
    """Standardised invariant features of patches ``x`` ``(N, 1, H, W)`` as ``model_cfg``'s invariant class head
    reads them: what the warm start clusters (for a model whose class head reads pixels too), and the one place a
    config's feature fields become an ``InvariantFeatures`` outside the encoder."""
    from models.nets import InvariantFeatures

    features = InvariantFeatures(
        model_cfg.patch,
        rotation=model_cfg.class_rotation,
        translation=model_cfg.translation,
        quantiles=model_cfg.class_quantiles,
        moments=model_cfg.class_moments,
    )
    return features.to(x.device, x.dtype).calibrate(x)


def _anchor_fraction(ramp_fraction: float, epoch: int, n_epochs: int) -> float:
    """1 at the first epoch, falling linearly to 0 at the end of the β ramp (at once when there is no ramp)."""
    ramp = ramp_fraction * n_epochs
    return 0.0 if ramp <= 0 else max(0.0, 1.0 - epoch / ramp)


def _fit_class_head(
    model: JTrVAE, x: Tensor, target: Tensor, *, lr: float, batch_size: int, seed: int, max_steps: int = 500
) -> None:
    """Fit the encoder's class logits to the soft labels ``target`` by cross-entropy, until ``KL(target ‖ q)`` on a
    batch is below 0.05 nats (q as confident as the clusters, not merely agreeing in argmax) or ``max_steps`` Adam
    steps have run (at least two passes over small data).

    Only the encoder moves, and only here, before Pyro registers it: from then on the optimiser state and the
    param store start from these weights. It costs encoder steps only, a small fraction of one training epoch.
    """
    opt = torch.optim.Adam(model.encoder.parameters(), lr=lr)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    min_steps = 2 * math.ceil(n / batch_size)
    for step in range(max(max_steps, min_steps)):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        log_q = torch.log_softmax(model.encoder(model._flat(x[idx]))["class_logits"], dim=-1)
        loss = -(target[idx] * log_q).sum(dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = target[idx]
        gap = loss + (t * torch.log(t.clamp_min(1e-12))).sum(dim=-1).mean()  # CE − H(target) = KL(target ‖ q)
        if step >= min_steps and gap < 0.05:
            break


def _progress(epochs: int, steps_per_epoch: int, enabled: bool) -> Any:
    """A bar over optimisation steps (not epochs), so a long epoch still shows movement and an ETA."""
    if not enabled or epochs <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs * steps_per_epoch, desc="train", unit="step", dynamic_ncols=True)
