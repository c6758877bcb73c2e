"""Training side of atomstream: networks, the Pyro j-trVAE, training, checkpoints.

Names are imported lazily so that ``import models.nets`` or ``models.config`` (what the exporter and tests need)
does not pull in Pyro; ``from models import fit`` still works.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["JTrVAE", "TrainResult", "evaluate_loss", "fit", "load_run", "save_run"]

_WHERE = {
    "JTrVAE": "models.jtrvae",
    "TrainResult": "models.train",
    "evaluate_loss": "models.train",
    "fit": "models.train",
    "load_run": "models.checkpoint",
    "save_run": "models.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
