"""Parity lines for the device benchmarks: named outputs of one path against the CPU's, largest |Δ| per output.

``encode_speed.py`` and ``stream_throughput.py`` (``--parity``, run by ``gpu_check.sh``) compare each GPU path with
the CPU result on the same input before their speed means anything. ``angle`` is compared on the circle, as the
exporter's parity does (``exporters.verify``); integer maps (the class argmax) by the share of entries that differ,
reported as ``name≠``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["compare", "parity_line"]


def _array(value: object) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor on any device (benchmarks only: no torch import here)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()  # type: ignore[attr-defined]
    return np.asarray(value)


def compare(got: Mapping[str, object], want: Mapping[str, object]) -> dict[str, float]:
    """For every output both have: the largest |Δ| (float outputs; ``inf`` for a shape mismatch or a non-finite
    value), or, under ``name≠``, the share of entries that differ (integer outputs). Empty: nothing to compare."""
    out: dict[str, float] = {}
    for name in sorted(set(got) & set(want)):
        g, w = _array(got[name]), _array(want[name])
        if g.shape != w.shape:
            out[name] = math.inf
        elif not np.issubdtype(w.dtype, np.floating):
            out[f"{name}≠"] = float((g != w).mean()) if w.size else 0.0
        else:
            diff = g.astype(np.float64) - w.astype(np.float64)
            if name == "angle":
                diff = np.remainder(diff + math.pi, 2 * math.pi) - math.pi
            out[name] = math.inf if not np.isfinite(diff).all() else float(np.abs(diff).max(initial=0.0))
    return out


def parity_line(
    label: str,
    diffs: Mapping[str, float],
    tolerance: float,
    *,
    max_differing: float = 0.0,
    looser: Mapping[str, float] | None = None,
) -> bool:
    """Print one ``# parity`` line and say whether it passed: float Δ within ``tolerance`` (times ``looser[name]``
    where given, shown in the line), integer maps differing on at most ``max_differing`` of their entries, and at
    least one output compared."""
    looser = looser or {}

    def bound(name: str) -> float:
        return max_differing if name.endswith("≠") else tolerance * looser.get(name, 1.0)

    passed = bool(diffs) and all(d <= bound(n) for n, d in diffs.items())
    cells = ", ".join(f"{name} {d:.1e}" for name, d in diffs.items()) or "no common outputs"
    wider = "".join(f", {name} at {factor:g}×" for name, factor in looser.items() if name in diffs)
    print(f"# parity {label}: {cells} (tolerance {tolerance:g}{wider}) -> {'ok' if passed else 'FAILED'}", flush=True)
    return passed
