"""The train / encode / evaluate / plot commands: one-line errors for user mistakes, and the documented outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atomstream.cli import main
from models.evaluate import matched_class_names


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = np.zeros((40, 12, 12), np.float32)
    images[labels == 0, 3:9, 5:7] = 1.0  # a bar
    images[labels == 1, 5:7, 2:10] = 1.0  # its transpose
    images += rng.uniform(0, 0.05, images.shape).astype(np.float32)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=np.clip(images, 0, 1), labels=labels, shear=rng.normal(size=40), angle=rng.normal(size=40))
    return path


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    path = tmp_path / "scan.npy"
    np.save(path, np.random.default_rng(1).normal(size=(2, 30, 36)).astype(np.float32))
    return path


def _entropy(*columns: np.ndarray) -> float:
    """Entropy in nats of the joint distribution of the columns (independent of models.evaluate's contingency)."""
    _, counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--atoms"], "atom-centred patches need a scan"),
        (["--classes", "-1"], "--classes -1"),
        (["--patch", "16"], "does not match"),
        (["--latent", "0"], "--latent 0"),
        (["--decoder", "dense"], "dense decoder cannot draw a rotated or shifted grid"),
    ],
)
def test_train_rejects_contradictory_options(
    stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    err = _error_line(capsys, ["train", "--data", str(stack), "--out", str(tmp_path / "run"), *extra])
    assert err.startswith("atomstream train: error:") and needle in err


def test_train_rejects_bad_paths_and_shapes(scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "run")
    assert "no such file" in _error_line(capsys, ["train", "--data", str(tmp_path / "nope.npy"), "--out", out])
    assert "larger than" in _error_line(capsys, ["train", "--data", str(scan), "--patch", "64", "--out", out])
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 4, 5)))
    assert "4-D" in _error_line(capsys, ["train", "--data", str(bad), "--out", out])
    weird = tmp_path / "x.xyz"
    weird.write_text("hello")
    assert "unknown scan format" in _error_line(capsys, ["train", "--data", str(weird), "--out", out])


def test_encode_and_evaluate_need_a_run_directory(
    stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error_line(
        capsys, ["encode", str(tmp_path / "norun"), "--data", str(stack), "--out", str(tmp_path / "e.npz")]
    )
    assert "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _error_line(capsys, ["evaluate", str(tmp_path / "empty"), "--data", str(stack)])
    assert "config.json" in err


@pytest.mark.slow
def test_train_encode_evaluate_plot_end_to_end(stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(stack), "--classes", "2", "--latent", "2", "--epochs", "2", "--hidden", "16"]
    argv += ["--batch-size", "16", "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(run)]
    assert main(argv) == 0
    assert (run / "config.json").is_file()
    out = capsys.readouterr().out.splitlines()
    usage = [line for line in out if line.startswith("class usage: ")]
    matmul = [line for line in out if line.startswith("decoder matmuls: ")]
    assert matmul and matmul[0].startswith("decoder matmuls: full (--decoder-matmul full; bfloat16 "), out
    printed = [part.split()[-1] for part in usage[0].removeprefix("class usage: ").split(", ")]

    enc_path = tmp_path / "enc.npz"
    assert main(["encode", str(run), "--data", str(stack), "--out", str(enc_path)]) == 0
    with np.load(enc_path) as enc:
        assert set(enc.files) == {"class_prob", "z", "angle", "shift", "positions"}
        assert enc["class_prob"].shape == (40, 2) and enc["z"].shape == (40, 2)
        assert enc["angle"].shape == (40,) and enc["shift"].shape == (40, 2)
        np.testing.assert_allclose(enc["class_prob"].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(enc["positions"][:, 0], np.arange(40))
        pred = enc["class_prob"].argmax(axis=1)
    # what train printed is the share of the training patches each class wins, as encode sees them
    assert printed == [f"{share:.0%}" for share in np.bincount(pred, minlength=2) / 40]
    capsys.readouterr()

    assert main(["evaluate", str(run), "--data", str(stack), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    labels = np.arange(40) % 2
    # two clusters: the better of the two matchings; NMI as (H(p) + H(l) - H(p, l)) / mean(H(p), H(l))
    assert report["n"] == 40 and report["accuracy"] == pytest.approx(
        max(np.mean(pred == labels), np.mean(pred != labels))
    )
    h_pred, h_labels, h_joint = _entropy(pred), _entropy(labels), _entropy(pred, labels)
    nmi = 1.0 if h_pred == h_labels == 0 else (h_pred + h_labels - h_joint) / ((h_pred + h_labels) / 2)
    assert report["nmi"] == pytest.approx(nmi, abs=1e-9)
    assert np.asarray(report["confusion"]).sum() == 40
    assert set(report["spearman"]) == {"shear"}  # angle is absorbed by the rotation latent, so left out

    # beside the trivial method on the same patches: PCA + GMM sorts bars from their transposes perfectly
    assert main(["evaluate", str(run), "--data", str(stack), "--json", "--baseline"]) == 0
    base = json.loads(capsys.readouterr().out)["baseline"]
    assert base["n"] == 40 and base["accuracy"] == 1.0 and set(base["spearman"]) == {"shear"}
    assert main(["evaluate", str(run), "--data", str(stack), "--baseline"]) == 0
    printed = capsys.readouterr().out
    assert "baseline on the same patches: PCA + GMM(2)" in printed and "accuracy" in printed.split("baseline")[-1]

    assert main(["plot", str(run), "--data", str(stack), "--out", str(tmp_path / "fig"), "--steps", "3"]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == {"traversals.png", "manifolds.png", "conditioned.png", "confusion.png"}
    assert all((tmp_path / "fig" / name).stat().st_size > 0 for name in written)


@pytest.mark.slow
def test_classes_take_the_names_of_the_labels_they_match(
    stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with np.load(stack) as z:
        arrays = dict(z)
    named = tmp_path / "named.npz"
    np.savez(named, **arrays, class_names=np.array(["vertical", "horizontal"]))
    run = tmp_path / "run"
    argv = ["train", "--data", str(named), "--classes", "3", "--latent", "1", "--epochs", "3", "--hidden", "16"]
    argv += ["--batch-size", "8", "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(run)]
    assert main(argv) == 0
    names = json.loads((run / "config.json").read_text())["model"]["class_names"]
    enc_path = tmp_path / "enc.npz"
    assert main(["encode", str(run), "--data", str(named), "--out", str(enc_path)]) == 0
    with np.load(enc_path) as enc:
        pred = enc["class_prob"].argmax(axis=1)
    # the run is named by matching its own clusters to the labels (the rule itself: test_models_evaluate)
    assert tuple(names) == matched_class_names(pred, arrays["labels"], ("vertical", "horizontal"), 3)
    assert sum(n.startswith("unmatched") for n in names) >= 1  # three classes, two labels
    assert "classes named after the labels they match" in capsys.readouterr().out


@pytest.mark.slow
def test_scan_grid_run_encodes_positions_and_maps(
    scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(scan), "--patch", "8", "--stride", "4", "--fft", "--classes", "2", "--latent", "1"]
    argv += [
        "--no-translation",
        "--epochs",
        "1",
        "--hidden",
        "8",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["kind"] == "grid" and config["data"]["preprocessing"]["fft"] == "logmag"
    enc_path = tmp_path / "enc.npz"
    assert main(["encode", str(run), "--data", str(scan), "--out", str(enc_path)]) == 0
    gh, gw = (30 - 8) // 4 + 1, (36 - 8) // 4 + 1
    with np.load(enc_path) as enc:
        assert set(enc.files) == {"class_prob", "z", "angle", "positions", "grid"}
        assert tuple(enc["grid"]) == (gh, gw) and enc["z"].shape == (2 * gh * gw, 1)
        assert tuple(enc["positions"][gw + 1]) == (0, 4, 4)
    capsys.readouterr()
    assert main(["plot", str(run), "--data", str(scan), "--out", str(tmp_path / "fig"), "--frame", "1"]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == {"traversals.png", "conditioned.png", "maps_frame1.png"}
    assert "--frame 5" in _error_line(
        capsys, ["plot", str(run), "--data", str(scan), "--out", str(tmp_path / "fig"), "--frame", "5"]
    )


@pytest.mark.parametrize(
    ("kind", "fft", "flags", "translation"),
    [
        ("atoms", "none", [], False),  # the finder centred the patch: what is left to move is the signal
        ("grid", "logmag", [], False),  # an FFT magnitude is translation-invariant
        ("grid", "none", [], True),
        ("stack", "none", [], True),
        ("atoms", "none", ["--translation"], True),  # an explicit flag wins
        ("grid", "none", ["--no-translation"], False),
    ],
)
def test_the_translation_latent_is_off_by_default_for_atom_centred_and_fft_patches(
    kind: str, fft: str, flags: list[str], translation: bool
) -> None:
    from atomstream.cli import build_parser
    from atomstream.cli.train import run_config
    from models.config import DataConfig
    from streamer.maps.preprocess import Preprocessing

    data = DataConfig(kind=kind, preprocessing=Preprocessing(fft=fft))  # type: ignore[arg-type]
    args = build_parser().parse_args(["train", "--data", "x.npy", "--out", "run", *flags])
    run = run_config(args, data)
    assert run.model.translation is translation and run.model.rotation


@pytest.mark.parametrize(
    ("sublattice", "flags", "want"),
    [
        ("cells", [], (False, 4, "gaussian", 0.1, "rotation")),  # the polarisation recipe
        ("brightest", [], (True, 2, "bernoulli", 0.2, "model")),  # the configs' own defaults
        (
            "cells",
            ["--rotation", "--latent", "2", "--likelihood", "bernoulli"],
            (True, 2, "bernoulli", 0.1, "rotation"),
        ),
        ("cells", ["--class-invariance", "model", "--gaussian-scale", "0.2"], (False, 4, "gaussian", 0.2, "model")),
    ],
)
def test_unit_cell_patches_get_the_polarisation_recipe_unless_a_flag_says_otherwise(
    sublattice: str, flags: list[str], want: tuple
) -> None:
    from atomstream.cli import build_parser
    from atomstream.cli.train import run_config
    from models.config import DataConfig

    data = DataConfig(kind="atoms", atom_sublattice=sublattice)  # type: ignore[arg-type]
    args = build_parser().parse_args(["train", "--data", "x.npy", "--out", "run", *flags])
    m = run_config(args, data).model
    assert (m.rotation, m.latent_dim, m.likelihood, m.gaussian_scale, m.class_invariance) == want


@pytest.mark.parametrize(
    ("sublattice", "flags", "keep"),
    [("cells", [], "best_val"), ("brightest", [], "last"), ("cells", ["--keep", "last"], "last")],
)
def test_unit_cell_patches_keep_their_best_held_out_epoch_unless_told(
    sublattice: str, flags: list[str], keep: str
) -> None:
    from atomstream.cli import build_parser
    from atomstream.cli.train import run_config
    from models.config import DataConfig

    data = DataConfig(kind="atoms", atom_sublattice=sublattice)  # type: ignore[arg-type]
    args = build_parser().parse_args(["train", "--data", "x.npy", "--out", "run", *flags])
    assert run_config(args, data).train.keep == keep
