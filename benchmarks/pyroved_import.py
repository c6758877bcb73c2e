"""pyroVED, the published implementation, imported for the benchmarks that compare against it.

pyroVED is the ``bench`` extra (``pip install pyroved --no-deps``). Its plotting helpers import torchvision at package
import time; when torchvision is absent we register a stand-in module whose ``make_grid`` raises, since the benchmarks
only train and encode with it. Both benchmarks run as scripts, so this module is found next to them on ``sys.path``.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["import_pyroved"]


def import_pyroved() -> types.ModuleType:
    try:
        importlib.import_module("torchvision")
    except ImportError:
        stub = types.ModuleType("torchvision")
        utils = types.ModuleType("torchvision.utils")

        def make_grid(*args: object, **kwargs: object) -> None:
            raise RuntimeError("torchvision is not installed; pyroVED plotting is unavailable in this benchmark")

        utils.make_grid = make_grid  # type: ignore[attr-defined]
        stub.utils = utils  # type: ignore[attr-defined]
        sys.modules.setdefault("torchvision", stub)
        sys.modules.setdefault("torchvision.utils", utils)
    return importlib.import_module("pyroved")
