"""Synthetic data and recorded scans: the cards set, lattice scans with ground truth, readers, the replay producer.

Names are imported lazily (PEP 562) so ``import sim`` stays cheap and ``sim.cards`` works without ZeroMQ or the
streamer installed; ``sim.replay`` alone needs ``zmq`` and ``streamer.wire.protocol``. The one-call ``replay`` function
is ``sim.replay.replay`` (at package level the name ``sim.replay`` is the module).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CLASS_NAMES",
    "DEFECT_KINDS",
    "Cards",
    "LatticeConfig",
    "LatticeTruth",
    "ReplayError",
    "ReplaySummary",
    "Replayer",
    "Scan",
    "ScanFormatError",
    "load_cards",
    "make_cards",
    "read_scan",
    "save_npz",
    "stack_truths",
    "synth_frame",
    "synth_scan",
    "to_counts",
]

_HOME = {
    "CLASS_NAMES": "cards",
    "Cards": "cards",
    "load_cards": "cards",
    "make_cards": "cards",
    "save_npz": "cards",
    "DEFECT_KINDS": "lattice",
    "LatticeConfig": "lattice",
    "LatticeTruth": "lattice",
    "stack_truths": "lattice",
    "synth_frame": "lattice",
    "synth_scan": "lattice",
    "to_counts": "lattice",
    "Scan": "formats",
    "ScanFormatError": "formats",
    "read_scan": "formats",
    "ReplayError": "replay",
    "ReplaySummary": "replay",
    "Replayer": "replay",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sim.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
