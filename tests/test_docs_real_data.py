"""The real-data walkthrough's script (docs/real_data.py) on a small synthetic graphene-like lattice, so the
walkthrough breaks loudly here when the library under it changes; the real scan's part is skipped when it is absent.

The synthetic frame has √3×√3 ripples around its defects (``sim.lattice``, hexagonal, ``ripples=True``); the script
trains on its left half, exports the encoder, and streams both halves through ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from sim.lattice import LatticeConfig, synth_frame

ROOT = Path(__file__).resolve().parents[1]
REAL_SCAN = Path("/work/shared/data/stm_graphene_Hdefects.npy")


def _script() -> ModuleType:
    name = "docs_real_data"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "real_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Train on the left half of a synthetic scan, export, stream both halves (once for the module's tests)."""
    rd = _script()
    cfg = LatticeConfig(
        shape=(128, 192),
        kind="hexagonal",
        lattice_constant=8.0,
        column_sigma=1.2,
        n_defects=6,
        ripples=True,
        ripple_amplitude=0.6,
        ripple_decay=10.0,
        interface=False,
        polarization_amplitude=0.0,
        dtype="uint16",
    )
    frame, truth = synth_frame(cfg, seed=3)
    work = tmp_path_factory.mktemp("real_data")
    settings = rd.Settings(
        patch=16,
        stride=8,
        train_patches=200,
        epochs=2,
        batch_size=32,
        encoder_hidden=(32, 32),
        decoder_hidden=(32, 32),
        mark_radius=12.0,
    )
    left, right, split = rd.split_halves(frame)
    run = rd.run_config(settings, rd.data_config(settings, "synthetic"))
    result, patches = rd.train_half(left, run, work / "run", max_patches=settings.train_patches, seed=0)
    offline = rd.encode_images(result.model, patches.images)
    centres = patches.positions[:, 1:] + (settings.patch - 1) / 2
    marks = truth.defects[truth.defects[:, 1] < split]
    roles = rd.name_classes(offline["class_prob"], centres, marks, settings.mark_radius)
    named = rd.export_named(result, run, patches, roles, work / "artifact")
    halves = [rd.stream_half(work / "artifact", left, 0), rd.stream_half(work / "artifact", right, split)]
    return {
        "rd": rd,
        "frame": frame,
        "truth": truth,
        "split": split,
        "patches": patches,
        "offline": offline,
        "roles": roles,
        "named": named,
        "halves": halves,
        "result": result,
        "work": work,
    }


def test_halves_split_the_frame_at_its_middle_column() -> None:
    rd = _script()
    frame = np.arange(5 * 7).reshape(5, 7)
    left, right, split = rd.split_halves(frame)
    assert split == 3
    assert left.shape == (5, 3) and right.shape == (5, 4)
    np.testing.assert_array_equal(np.concatenate([left, right], axis=1), frame)


def test_run_is_the_papers_fft_setting() -> None:
    rd = _script()
    settings = rd.Settings()
    run = rd.run_config(settings, rd.data_config(settings, "x.npy"))
    assert (run.model.n_classes, run.model.latent_dim) == (3, 2)
    assert run.model.rotation and not run.model.translation
    pre = run.data.preprocessing
    assert (pre.fft, pre.window, pre.patch_norm, pre.frame_norm) == ("logmag", "hann", "minmax", "percentile")


def test_classes_are_named_by_size_then_by_closeness_to_marks() -> None:
    rd = _script()
    # class 2 is the majority (lattice); class 0 sits on the mark (defect); class 1 is the rest (interference)
    centres = np.array([[0.0, 0.0], [0.0, 5.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0], [80.0, 80.0], [90, 90]])
    cls = np.array([0, 0, 1, 2, 2, 2, 2])
    prob = np.eye(3)[cls]
    assert rd.name_classes(prob, centres, np.array([[0.0, 2.0]]), 10.0) == (2, 0, 1)
    enrich, cover = rd.mark_scores(prob, centres, np.array([[0.0, 2.0]]), 10.0)
    np.testing.assert_allclose(enrich, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(cover, [1.0, 0.0, 0.0])


def test_missing_scan_exits_with_a_message_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rd = _script()
    missing = tmp_path / "nowhere.npy"
    assert rd.main(["--data", str(missing), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data" in err
    assert not (tmp_path / "figs").exists()


def test_stream_of_the_training_half_equals_the_offline_encoding(walkthrough: dict) -> None:
    """Live equals offline: ONNX through the serving pipeline reproduces the trained model's posterior means."""
    halves, offline = walkthrough["halves"], walkthrough["offline"]
    maps = halves[0].maps
    assert maps.grid == walkthrough["patches"].grid
    np.testing.assert_allclose(maps.arrays["z"].reshape(-1, 2), offline["z"], atol=1e-4)
    np.testing.assert_array_equal(maps.arrays["class"].reshape(-1), offline["class_prob"].argmax(1))


def test_artifact_carries_the_role_names_and_flags_the_defect_class(walkthrough: dict) -> None:
    rd, roles, halves = walkthrough["rd"], walkthrough["roles"], walkthrough["halves"]
    assert sorted(roles) == [0, 1, 2]
    maps = halves[1].maps
    assert {maps.class_names[k] for k in roles} == set(rd.ROLES)
    assert maps.class_names[roles[1]] == "defect"
    np.testing.assert_allclose(maps.arrays["defect_score"], maps.arrays["class_prob"][..., roles[1]], atol=1e-6)


def test_unseen_half_is_mapped_on_its_own_grid(walkthrough: dict) -> None:
    frame, split, halves = walkthrough["frame"], walkthrough["split"], walkthrough["halves"]
    maps = halves[1].maps
    gh, gw = maps.grid
    assert (gh, gw) == ((frame.shape[0] - 16) // 8 + 1, (frame.shape[1] - split - 16) // 8 + 1)
    assert halves[1].x_offset == split
    assert np.isfinite(maps.arrays["z"]).all()


def test_figures_are_written(walkthrough: dict, tmp_path: Path) -> None:
    w = walkthrough
    rd = w["rd"]
    marks = w["truth"].defects
    paths = [
        *rd.plot_overview(w["frame"], w["halves"], w["roles"], marks, tmp_path),
        rd.plot_unseen(w["frame"], w["halves"][1], w["roles"], marks, tmp_path),
        rd.plot_class_examples(w["patches"], w["offline"], w["roles"], tmp_path),
        rd.plot_training(w["result"], tmp_path),
    ]
    assert [p.name for p in paths] == [
        "classes.png",
        "defect-map.png",
        "latents.png",
        "unseen-half.png",
        "class-examples.png",
        "training.png",
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not REAL_SCAN.is_file(), reason=f"{REAL_SCAN} is absent (evaluation data, not committed)")
def test_real_scan_halves_cut_into_the_documented_grids() -> None:
    """The numbers docs/real-data.md quotes: a 1423² scan, halves of 711 and 712 columns, 115×56 grids of patches."""
    rd = _script()
    frame = rd.load_frame(REAL_SCAN)
    assert frame.shape == (1423, 1423)
    left, right, split = rd.split_halves(frame)
    settings = rd.Settings()
    data = rd.data_config(settings, str(REAL_SCAN))
    for half in (left, right):
        patches = rd.scan_patches(half[None], data)
        assert patches.grid == (115, 56)
        assert patches.images.min() >= 0.0 and patches.images.max() <= 1.0
    assert all(0 <= y < 1423 and 0 <= x < 1423 for y, x in rd.MARKED_DEFECTS)
    assert sum(x < split for _, x in rd.MARKED_DEFECTS) == 5
