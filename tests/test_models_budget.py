"""The training-length plan: it times the step fit will really take, turns a budget into epochs within bounds, and
the epochs' own pace re-plans it so that the run ends by its deadline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.budget import plan_epochs, timing_model
from models.checkpoint import load_config
from models.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from models.deadline import Deadline
from models.train import fit


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


def _deadline(remaining: float, budget: float = 300.0, **bounds: int) -> Deadline:
    """A deadline ``remaining`` seconds ahead of a clock that stands still at 0."""
    return Deadline(at=remaining, budget_s=budget, clock=lambda: 0.0, **bounds)


@pytest.mark.parametrize(
    ("planned", "remaining", "expected", "why"),
    [
        (20, 190.0, 20, "on time: kept"),
        (21, 190.0, 21, "10 s late, within the tolerance (a twentieth of 300 s): kept, the β schedule undisturbed"),
        (50, 190.0, 20, "late: as many as fit at 10 s an epoch"),
        (10, 300.0, 31, "early: grows into the budget"),
        (50, -40.0, 5, "past the deadline: the floor of 5 epochs"),
        (2000, 1e9, 1000, "never above the ceiling"),
    ],
)
def test_the_deadline_re_plans_only_a_plan_that_would_miss_it(
    planned: int, remaining: float, expected: int, why: str
) -> None:
    assert _deadline(remaining).replan(1, planned, [10.0]) == expected, why


def test_the_re_plan_reads_the_recent_epochs_pace_and_never_drops_below_what_is_done() -> None:
    deadline = _deadline(100.0)
    assert deadline.replan(3, 60, [1.0, 20.0, 20.0, 20.0]) == 8  # median of the last three: 20 s
    assert _deadline(-10.0).replan(12, 60, [20.0]) == 12  # out of time after 12: stop there (not fewer)
    assert deadline.replan(0, 60, []) == 60  # nothing measured yet


def test_fit_ends_by_its_deadline_and_saves_what_it_trained(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    run = _run(epochs=20, val_fraction=0.2)
    late = fit(run, images, tmp_path / "late", deadline=Deadline(at=0.0, budget_s=60.0, min_epochs=3))
    assert late.epochs == 3 and len(late.history) == 3
    assert [row["planned_epochs"] for row in late.history] == [3, 3, 3]
    assert load_config(tmp_path / "late").train.epochs == 3  # a resume continues the run that was trained
    roomy = Deadline.starting_now(1e6, max_epochs=4)
    early = fit(_run(epochs=2, val_fraction=0.2), images, None, deadline=roomy)
    assert early.epochs == 4 and [row["epoch"] for row in early.history] == [0, 1, 2, 3]
    assert fit(run.model_copy(update={"train": run.train.model_copy(update={"epochs": 2})}), images, None).epochs == 2
