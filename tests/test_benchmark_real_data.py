"""``benchmarks/real_data.py --quick``: every case runs end to end (train, export calibrated, serve through the ONNX
pipeline, score against truths built independently, baselines beside) and prints its table. The real scans are
evaluation data, never committed: their cases are skipped when the files are absent (the demo case always runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ATOMSTREAM_REAL_DATA", "/work/shared/data"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_data  # noqa: E402


@pytest.mark.slow
def test_quick_benchmark_prints_every_case_beside_its_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert real_data.main(["--quick", "--data-dir", str(DATA), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "### demo lattice, seed 0" in out and "model contrast" in out and "PCA5+GMM3 likelihood" in out
    assert "clean frames publishing a defect" in out and "demo lattice over 1 seed(s)" in out
    # the published score (the kind calibration chose, as `atomstream export` does by default) and why
    assert "| published (joint) |" in out or "| published (residual) |" in out
    assert "- defect score calibrated: " in out and "the likelihood part flags" in out
    for name, (filename, _) in real_data.CASES.items():
        if (DATA / str(filename)).is_file():
            assert f"### {name}: skipped" not in out
        else:
            assert f"### {name}: skipped" in out
    if (DATA / "haadf_MoS2_Vdoped.npy").is_file():
        assert "unmatched published points within a patch of the frame edge" in out
    if (DATA / "haadf_PbTiO3_SrRuO3.npy").is_file():
        assert "film/substrate balanced accuracy: PCA2 + k-means" in out
    assert (tmp_path / "r.json").read_text().startswith("[")


@pytest.mark.slow
def test_the_defect_flags_and_a_first_seed_reach_the_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--first-seed`` picks the seeds a held-out check runs, and the export flags reach the served artifact: the
    published kind is the one asked for (the residual kind has no likelihood part to score)."""
    argv = ["--quick", "--cases", "demo", "--seeds", "1", "--first-seed", "1", "--data-dir", str(DATA)]
    flags = ["--defect-score", "residual", "--defect-k", "4.5", "--defect-span", "2"]
    assert real_data.main([*argv, *flags, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "### demo lattice, seed 1" in out and "seed 0" not in out
    assert "| model residual |" in out and "| model joint |" not in out
    assert "| published (residual) |" in out and "- defect score calibrated: residual at k 4.5; nothing chosen" in out
    assert (real_data.DEFECT_K[0], real_data.DEFECT_SPAN[0]) == (4.5, 2)
