"""Keeping a time-budgeted training to its budget: the epoch count re-planned from the epochs' own pace.

Why: ``models.budget.plan_epochs`` times three warm-up steps, and on a shared 2-core machine three steps are a noisy
clock — the same 16-px card run planned 76 epochs once (425 s for a 300 s budget) and 38 another time (202 s). An
epoch is tens of steps plus the validation pass, so its time is the better estimate, and the one that follows the
machine when its load changes. ``fit`` asks ``Deadline.replan`` after every epoch how many epochs the run should have
in total; the answer moves only when the current plan would miss the deadline by more than a tolerance (one epoch,
and at least a twentieth of the budget), so a steady run is re-planned at most once, after its first epoch, and
the β schedule — which is laid over the planned epochs — is not jostled by timing noise.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Deadline"]


@dataclass(frozen=True)
class Deadline:
    """The moment (``time.monotonic``) the epochs must end by, and the plan's bounds.

    ``min_epochs`` is a floor that can overrun the budget on purpose (fewer epochs do not train a model worth
    exporting); ``reserve_s`` is kept free after the last epoch for what ``fit`` and the CLI still do then (the
    class diagnosis, saving, naming the classes).
    """

    at: float
    budget_s: float
    min_epochs: int = 5
    max_epochs: int = 1000
    reserve_s: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    @classmethod
    def starting_now(cls, budget_s: float, *, min_epochs: int = 5, max_epochs: int = 1000) -> Deadline:
        """A deadline ``budget_s`` from now, with 3 % of it reserved for the work after the last epoch."""
        if budget_s <= 0:
            raise ValueError(f"budget_s={budget_s} must be positive")
        return cls(
            at=time.monotonic() + budget_s,
            budget_s=budget_s,
            min_epochs=min_epochs,
            max_epochs=max_epochs,
            reserve_s=0.03 * budget_s,
        )

    def remaining_s(self) -> float:
        return self.at - self.reserve_s - self.clock()

    def replan(self, done: int, planned: int, epoch_seconds: Sequence[float]) -> int:
        """The total epochs the run should have, after ``done`` epochs that took ``epoch_seconds`` (the last few).

        ``planned`` is kept unless finishing it would miss the deadline, early or late, by more than the tolerance;
        otherwise as many epochs as fit in the time left at the median pace of the recent epochs, within
        ``[max(min_epochs, done), max_epochs]``.
        """
        if not epoch_seconds or done < 1:
            return planned
        pace = statistics.median(epoch_seconds[-3:])
        remaining = self.remaining_s()
        miss = (planned - done) * pace - remaining  # > 0: late, < 0: early
        if abs(miss) <= max(pace, 0.05 * self.budget_s):
            return planned
        fits = done + math.floor(max(remaining, 0.0) / max(pace, 1e-9))
        return int(min(self.max_epochs, max(self.min_epochs, done, fits)))
