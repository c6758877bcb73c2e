"""Silence torch's own deprecation notices around tracing, scripting and the TorchScript-based ONNX exporter.

A leaf module: ``exporters.export`` (which writes the files) and ``exporters.verify`` (which loads them back for
parity) both need it, and neither may import the other for it — that was the package's only import cycle.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["quiet_export_warnings"]


@contextmanager
def quiet_export_warnings() -> Iterator[None]:
    """torch announces the deprecation of TorchScript and of the TorchScript-based ONNX exporter on every call.

    Those notices are upstream's, not ours; parity, not the absence of warnings, is what proves an export right.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
