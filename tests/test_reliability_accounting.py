"""Accounting under a mixed stream: received = maps + errors, exactly, wherever it is counted.

A short version of ``benchmarks/soak.py`` (the long one runs 10,000 frames): 500 frames of 64x64, 5 % of them bad in
every way the soak knows, through a live service. The scan's ``scan_summary``, ``/metrics`` scraped over HTTP and a
subscriber counting frame ids must all agree with what was sent, every bad frame must come back with the reason it
deserves, and no frame id may be missing. The soak's own counting is used (one implementation), and checked here
against numbers computed independently from what the producer sent.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from artifact_factory import make_artifact
from zmq_helpers import service_config

from streamer.service.config import ServiceConfig
from streamer.service.facade import Service

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 500
BAD_FRACTION = 0.05


def _load_soak() -> ModuleType:
    """``benchmarks/soak.py`` (a script, not a package) imported by path."""
    spec = importlib.util.spec_from_file_location("atomstream_soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("soaked"), seed=3)


def _config(**fields: Any) -> ServiceConfig:
    return service_config(**{"max_frame_bytes": 16 * 1024 * 1024, **fields})


def test_a_mixed_stream_is_accounted_for_in_summary_metrics_and_subscriber(artifact: Path) -> None:
    with Service(_config(artifact=artifact)) as svc:
        svc.wait_ready(30)
        assert svc.metrics_url is not None
        result = soak.run_soak(
            ingest=svc.ingest_endpoint,
            publish=svc.publish_endpoint,
            metrics_url=svc.metrics_url,
            frames=FRAMES,
            bad_fraction=BAD_FRACTION,
            seed=1,
            timeout_s=90,
        )
    print("\n" + result.table())
    assert result.problems() == [], result.table()

    # the same figures, from what the producer sent rather than from the soak's own checks
    n_bad = round(FRAMES * BAD_FRACTION)
    n_anonymous = sum(1 for k in range(n_bad) if list(soak.BAD_KINDS)[k % len(soak.BAD_KINDS)] in soak.ANONYMOUS)
    assert n_anonymous > 0 and len(result.maps) == FRAMES - n_bad
    assert result.lost == [] and not result.misreported
    by_reason = Counter(result.errors.values()) + result.anonymous_errors
    assert by_reason == Counter(soak.BAD_KINDS[list(soak.BAD_KINDS)[k % len(soak.BAD_KINDS)]] for k in range(n_bad))
    summary = result.summary
    assert (summary.scan_id, summary.n_frames) == ("soak", FRAMES)
    assert summary.frames_received == FRAMES - n_anonymous  # an unreadable header names no scan
    assert (summary.frames_published, summary.frames_rejected, summary.frames_dropped) == (
        FRAMES - n_bad,
        n_bad - n_anonymous,
        0,
    )
    assert result.metrics == {"received": FRAMES, "published": FRAMES - n_bad, "rejected": n_bad, "dropped": 0}
    assert (result.gaps, result.restarts) == (0, 0)
