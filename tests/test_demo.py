"""The demo pipeline end to end at reduced size: the README's main job must keep working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atomstream.demo import DemoOptions, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_report_matches_its_figures(tmp_path: Path) -> None:
    opts = DemoOptions(
        out=tmp_path, size=96, frames=3, train_frames=2, epochs=2, n_defects=4, progress=False, throughput_frames=7
    )
    result = run_demo(opts)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames_sent"] == 3 and metrics["maps_received"] == 3
    summary = metrics["scan_summary"]
    assert (summary["frames_received"], summary["frames_published"], summary["frames_rejected"]) == (3, 3, 0)
    report = result.report.read_text()  # quality is held at the demo's own size (the test below), not at 2 epochs
    assert f"{metrics['phase_accuracy_held_out']:.3f}" in report
    assert f"{metrics['latency_ms_p50']:.3f}" in report
    assert metrics["throughput_frames"] == 9  # the 3-frame scan replayed 3 times: at least the 7 asked for
    assert "throughput over 9 frames" in report and "{" not in report  # a table, no raw dict
    assert [f.name for f in result.figures] == ["maps.png", "traversals.png", "manifolds.png"]
    for figure in result.figures:
        assert figure.stat().st_size > 5_000 and f"({figure.name})" in report
    assert (tmp_path / "artifact" / "manifest.json").is_file() and (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.slow
def test_demo_at_its_default_size_maps_film_and_substrate_on_frames_it_did_not_train_on(tmp_path: Path) -> None:
    """The README's promise, measured: with the demo's own settings (seed 0) the class map follows the interface.

    Five seeds of the default demo gave 0.991, 0.954, 0.984, 0.504 and 0.966; the fourth is the mixture settling on
    the lattice's registration instead of the phase (see the README's limitations), which is why the seed is fixed.
    """
    result = run_demo(DemoOptions(out=tmp_path, progress=False))
    assert result.metrics["phase_accuracy_held_out"] >= 0.9
    assert result.metrics["maps_received"] == result.metrics["frames_sent"] == DemoOptions().frames
