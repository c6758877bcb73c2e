"""Shared test setup: every test starts with an empty Pyro param store and Pyro's validation on (as Pyro's own
test suite does), so no test depends on what another left behind; ``zs`` tracks a test's sockets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from zmq_helpers import Sockets, sockets


@pytest.fixture(autouse=True)
def _fresh_pyro() -> Iterator[None]:
    try:
        import pyro
    except ImportError:  # the serving install has no Pyro; its tests need none of this
        yield
        return
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Commands run in-process (``main([...])``) set torch's thread count as the CLI should; later tests get theirs
    back."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None:
        torch.set_num_threads(before)


@pytest.fixture
def zs() -> Iterator[Sockets]:
    """Sockets made in a test, all closed with linger=0 when it ends."""
    with sockets() as s:
        yield s
