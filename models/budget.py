"""How many epochs fit in a time budget: a timed warm-up on the real data and model, before training starts.

Why: the cost of one step is ``pixels × classes × batch × hidden²`` and varies by two orders of magnitude between a
16-px stack and a 48-px scan, so no fixed epoch count is right for both; a newcomer's 3-epoch run took 13 minutes
and a default 100-epoch one would have taken hours. Timing a few real steps of the real configuration is the only
estimate that knows this machine, its load and its thread count. Three steps are still a noisy clock on a shared
machine, so ``fit`` re-plans from the epochs' own pace as it goes (``models.deadline``); this plan is the start.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from models.config import RunConfig
from models.jtrvae import JTrVAE
from models.train import make_elbo, with_training_settings

__all__ = ["EpochPlan", "plan_epochs", "timing_model"]


@dataclass(frozen=True)
class EpochPlan:
    epochs: int
    seconds_per_step: float
    steps_per_epoch: int
    budget_s: float

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds_per_step * self.steps_per_epoch

    @property
    def estimate_s(self) -> float:
        return self.epochs * self.seconds_per_epoch

    def describe(self) -> str:
        return (
            f"{self.epochs} epochs of {self.steps_per_epoch} steps at ~{self.seconds_per_step * 1e3:.0f} ms/step "
            f"(timed warm-up): about {_minutes(self.estimate_s)} for a budget of {_minutes(self.budget_s)}"
        )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def timing_model(cfg: RunConfig) -> JTrVAE:
    """A fresh model, in training mode, that takes the step ``fit`` will take (``with_training_settings``)."""
    return with_training_settings(JTrVAE(cfg.model), cfg.train).train()


def plan_epochs(
    cfg: RunConfig,
    images: np.ndarray,
    budget_s: float,
    *,
    min_epochs: int = 5,
    max_epochs: int = 1000,
    warmup_steps: int = 3,
) -> EpochPlan:
    """The number of epochs of ``cfg`` on ``images`` that fits in ``budget_s`` seconds, from timed steps.

    A throwaway model takes one untimed step (allocations, first-call overheads), then ``warmup_steps`` timed ones
    on full batches of the real patches. Validation and the class warm start add about a tenth, which the plan
    leaves free. Pyro's param store is cleared afterwards (``fit`` clears and seeds it again anyway).
    """
    if budget_s <= 0:
        raise ValueError(f"budget_s={budget_s} must be positive")
    tc = cfg.train
    n_train = max(1, round(len(images) * (1 - tc.val_fraction)))
    steps_per_epoch = math.ceil(n_train / tc.batch_size)
    batch = torch.as_tensor(np.asarray(images[: tc.batch_size]), dtype=torch.float32)
    pyro.clear_param_store()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(tc.seed)
            model = timing_model(cfg)
            svi = SVI(model.model, model.guide, Adam({"lr": tc.lr}), loss=make_elbo(model))
            beta = tc.annealing.at(0, tc.epochs)
            svi.step(batch, beta)
            t0 = time.perf_counter()
            for _ in range(warmup_steps):
                svi.step(batch, beta)
            per_step = (time.perf_counter() - t0) / warmup_steps
    finally:
        pyro.clear_param_store()
    usable = 0.9 * budget_s
    epochs = int(min(max_epochs, max(min_epochs, usable // max(per_step * steps_per_epoch, 1e-9))))
    return EpochPlan(epochs=epochs, seconds_per_step=per_step, steps_per_epoch=steps_per_epoch, budget_s=budget_s)
