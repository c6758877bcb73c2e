"""The training-length plan: it times the step fit will really take, and turns a budget into epochs within bounds."""

from __future__ import annotations

import numpy as np
import pytest

from models.budget import plan_epochs, timing_model
from models.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def _run(**train: object) -> RunConfig:
    model = ModelConfig(patch=(8, 8), n_classes=2, latent_dim=1, encoder_hidden=(8,), decoder_hidden=(8,))
    return RunConfig(model=model, train=TrainConfig(batch_size=8, progress=False, **train), data=DataConfig(source="x"))


def test_the_timed_model_takes_fits_threads_matmul_precision_and_pixel_share() -> None:
    model = timing_model(_run(likelihood_threads=2, pixel_fraction=0.25, decoder_matmul="bfloat16"))
    assert model.likelihood_threads == 2 and model.pixel_fraction == 0.25 and model.training
    assert model.likelihood_matmul == "bfloat16"
    assert timing_model(_run(decoder_matmul="full")).likelihood_matmul == "full"


@pytest.mark.parametrize(("budget", "expected"), [(1e-6, 5), (1e9, 1000)])
def test_a_budget_becomes_epochs_within_bounds(budget: float, expected: int) -> None:
    images = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    plan = plan_epochs(_run(val_fraction=0.2), images, budget, min_epochs=5, max_epochs=1000, warmup_steps=1)
    assert plan.epochs == expected
    assert plan.steps_per_epoch == 4  # 32 training images in batches of 8
    assert plan.seconds_per_step > 0
    with pytest.raises(ValueError, match="budget_s=0"):
        plan_epochs(_run(), images, 0)
