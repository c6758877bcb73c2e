"""``atomstream export`` end to end: a tiny trained run becomes an artifact whose backends match the Pyro guide."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from atomstream.cli import main
from exporters.verify import MIN_PARITY_PATCHES, ParityError, check_parity
from models.checkpoint import load_run, save_run
from models.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from models.jtrvae import JTrVAE
from models.train import fit
from sim.cards import CLASS_NAMES, make_cards, save_npz
from streamer.maps.encoder import load
from streamer.maps.manifest import read_manifest, sha256_file
from streamer.maps.preprocess import Preprocessing

PATCH = (16, 16)


def _tiny_run(source: Path, *, dtype: str = "float32") -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            patch=PATCH,
            n_classes=4,
            latent_dim=2,
            encoder_hidden=(32,),
            decoder_hidden=(32,),
            class_names=CLASS_NAMES,
        ),
        train=TrainConfig(epochs=2, batch_size=128, lr=1e-3, seed=0, device="cpu", progress=False, dtype=dtype),
        data=DataConfig(source=str(source), kind="stack", patch=PATCH, preprocessing=Preprocessing(frame_norm="none")),
        name="cards-tiny",
        version="0.0.1",
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cards = make_cards(1100, size=PATCH[0], rotation=60.0, seed=0)
    save_npz(root / "cards.npz", cards)
    fit(_tiny_run(root / "cards.npz"), cards.images[:256], root / "run")  # a subset keeps the test fast
    return root / "run"


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("exported")
    out, repo = root / "artifact", root / "triton"
    argv = ["export", str(trained_run), "--out", str(out), "--triton", str(repo), "--fp16", "--defect-class", "hearts"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return out, repo, buf.getvalue()


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_export_writes_a_verified_manifest(exported: tuple[Path, Path, str], trained_run: Path) -> None:
    out, _, stdout = exported
    assert f"parity data: the run's data {trained_run.parent / 'cards.npz'} (stack)" in stdout
    m = read_manifest(out)
    assert sorted(m.files) == ["encoder.fp16.onnx", "encoder.frame.onnx", "encoder.onnx", "encoder.ts"]
    assert m.frame_stride == m.tiling.stride  # a grid with no per-patch steps: grid frames encode whole
    assert all(m.files[name].sha256 == sha256_file(out / name) for name in m.files)
    assert (m.name, m.version, m.variant, m.onnx_opset) == ("cards-tiny", "0.0.1", "jtrVAE", 17)
    assert m.patch == PATCH and m.class_names == CLASS_NAMES and m.defect_classes == (3,)
    assert m.preprocessing == Preprocessing(frame_norm="none") and m.tiling.layout == "grid"
    assert m.parity.n_patches == 1100 and "cards.npz" in m.parity.data
    by_backend = {r.backend: r for r in m.parity.backends}
    assert set(by_backend) == {"onnx", "torchscript", "onnx_fp16", "onnx_frame"}
    for name in ("onnx", "torchscript", "onnx_frame"):
        r = by_backend[name]
        assert r.passed and r.argmax_agreement == 1.0
        assert set(r.max_abs_diff) == set(m.output_names) and max(r.max_abs_diff.values()) <= 1e-4


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_artifact_matches_the_guide_on_unseen_cards(
    exported: tuple[Path, Path, str], trained_run: Path, backend: str
) -> None:
    model, _ = load_run(trained_run)
    unseen = torch.from_numpy(make_cards(1024, size=PATCH[0], rotation=120.0, seed=99).images[:, None])
    enc = load(exported[0], backend=backend, device="cpu", batch_sizes=(1, 256))  # type: ignore[arg-type]
    got = enc(unseen)
    want = model.encode(unseen)
    for name, key in (("class_prob", "class_prob"), ("z_loc", "z"), ("z_scale", "z_scale"), ("shift", "shift")):
        assert float((got[name] - want[key]).abs().max()) <= 1e-4, name
    dangle = torch.remainder(got["angle"] - want["angle"] + torch.pi, 2 * torch.pi) - torch.pi
    assert float(dangle.abs().max()) <= 1e-4
    assert torch.equal(got["class_prob"].argmax(-1), want["class_prob"].argmax(-1))


def test_fp16_variant_loads_and_roughly_agrees(exported: tuple[Path, Path, str]) -> None:
    x = torch.from_numpy(make_cards(64, size=PATCH[0], seed=7).images[:, None])
    full = load(exported[0], device="cpu", batch_sizes=(1,))(x)
    half = load(exported[0], device="cpu", batch_sizes=(1,), fp16=True)(x)
    assert float((full["class_prob"] - half["class_prob"]).abs().max()) < 5e-2
    assert half["z_loc"].dtype == torch.float32


def _parse_pbtxt_tensors(text: str, section: str) -> dict[str, tuple[list[int], list[int] | None]]:
    block = re.search(rf"^{section} \[\n(.*?)\n\]", text, flags=re.S | re.M)
    assert block is not None, text
    found = {}
    for entry in re.findall(r"\{(.*?)\n  \}", block.group(1), flags=re.S):
        name = re.search(r'name: "([^"]+)"', entry).group(1)  # type: ignore[union-attr]
        dims = [int(d) for d in re.search(r"dims: \[([^\]]*)\]", entry).group(1).replace(",", " ").split()]  # type: ignore[union-attr]
        reshape = re.search(r"reshape: \{ shape: \[([^\]]*)\] \}", entry)
        found[name] = (dims, None if reshape is None else [int(d) for d in reshape.group(1).split()])
    return found


def test_triton_entry_lists_exactly_the_manifest_io(exported: tuple[Path, Path, str]) -> None:
    out, repo, _ = exported
    m = read_manifest(out)
    model_dir = repo / "cards-tiny"
    text = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and 'name: "cards-tiny"' in text
    assert re.search(r"^max_batch_size: [1-9]\d*$", text, flags=re.M)
    assert "dynamic_batching {" in text
    assert sha256_file(model_dir / "1" / "model.onnx") == m.files["encoder.onnx"].sha256
    inputs = _parse_pbtxt_tensors(text, "input")
    outputs = _parse_pbtxt_tensors(text, "output")
    assert inputs == {"patches": ([1, *PATCH], None)}
    assert list(outputs) == list(m.output_names)
    for spec in m.outputs:
        dims = [int(d) for d in spec.shape[1:]]
        assert outputs[spec.name] == ((dims, None) if dims else ([1], []))


def test_parity_data_option(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    patches = make_cards(MIN_PARITY_PATCHES, size=PATCH[0], seed=3).images
    np.savez(tmp_path / "p.npz", patches=patches)
    assert (
        main(["export", str(trained_run), "--out", str(tmp_path / "a"), "--parity-data", str(tmp_path / "p.npz")]) == 0
    )
    assert f"parity data: preprocessed patches from {tmp_path / 'p.npz'}" in capsys.readouterr().out
    assert read_manifest(tmp_path / "a").parity.n_patches == MIN_PARITY_PATCHES
    np.savez(tmp_path / "bad.npz", patches=np.zeros((3, 8, 8), np.float32))
    err = _error_line(
        capsys, ["export", str(trained_run), "--out", str(tmp_path / "b"), "--parity-data", str(tmp_path / "bad.npz")]
    )
    assert err.startswith("atomstream export: error: --parity-data:") and "N×16×16" in err


def test_unreadable_run_data_falls_back_loudly(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, cfg = load_run(trained_run)
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(tmp_path / "gone.npz")})})
    save_run(tmp_path / "run", model, moved, epoch=2, history=[])
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "cannot re-read the run's data source" in captured.err and "uniform random" in captured.err
    assert "FALLBACK" in read_manifest(tmp_path / "a").parity.data


def test_parity_failure_is_one_line_naming_backend_output_and_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A float64 run whose logits are huge cannot be served in float32 to 1e-4: the export must say so."""
    cfg = _tiny_run(tmp_path / "none.npz", dtype="float64")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = JTrVAE(cfg.model).double()
    with torch.no_grad():
        model.encoder.class_head.net[-1].weight *= 1e5  # the class logits come from the invariant class head
    save_run(tmp_path / "run", model, cfg, epoch=1, history=[])
    np.savez(tmp_path / "p.npz", patches=make_cards(MIN_PARITY_PATCHES, size=PATCH[0], seed=3).images)
    argv = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--parity-data", str(tmp_path / "p.npz")]
    err = _error_line(capsys, argv)
    assert re.search(
        r"error: parity failed: (onnx|torchscript) output 'class_logits' max \|Δ\| = \S+ > 0\.0001", err
    ), err
    assert not (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / "a" / "encoder.onnx").exists()


def test_parity_needs_enough_patches(exported: tuple[Path, Path, str], trained_run: Path) -> None:
    model, _ = load_run(trained_run)
    from exporters.export import latent_layout

    with pytest.raises(ParityError, match="at least 1024 patches"):
        check_parity(
            model, latent_layout(model.cfg), {"onnx": exported[0] / "encoder.onnx"}, torch.rand(10, 1, 16, 16), data="x"
        )


def test_cli_rejects_bad_arguments(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in _error_line(capsys, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert "--opset 13" in _error_line(
        capsys, ["export", str(trained_run), "--out", str(tmp_path / "a"), "--opset", "13"]
    )
    err = _error_line(capsys, ["export", str(trained_run), "--out", str(tmp_path / "a"), "--defect-class", "jokers"])
    assert "--defect-class 'jokers'" in err
    assert json.loads((trained_run / "config.json").read_text())["name"] == "cards-tiny"


def test_defect_k_and_span_reach_the_manifest_and_are_checked(
    tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--defect-k`` / ``--defect-span``: a grid run's artifact carries both (the server scores with them); a bad
    k, or a span for patches that are not a grid, is one line naming the flag."""
    from sim.lattice import LatticeConfig, synth_scan

    frames, _ = synth_scan(LatticeConfig(shape=(96, 96), n_defects=0), 1, seed=0)
    np.save(tmp_path / "scan.npy", frames[0])
    run = tmp_path / "run"
    train = ["train", "--data", str(tmp_path / "scan.npy"), "--patch", "16", "--stride", "8", "--classes", "2"]
    assert main([*train, "--hidden", "16", "--epochs", "1", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "artifact"
    flags = ["--defect-score", "residual", "--defect-k", "4.5", "--defect-span", "3"]
    assert main(["export", str(run), "--out", str(out), *flags]) == 0
    assert "threshold median + 4.5 robust sd" in capsys.readouterr().out
    novelty = read_manifest(out).novelty
    assert novelty is not None and (novelty.kind, novelty.k, novelty.grid_step, novelty.grid_span) == (
        "residual",
        4.5,
        2,
        3,
    )
    err = _error_line(capsys, ["export", str(run), "--out", str(tmp_path / "b"), "--defect-k", "0"])
    assert "--defect-k 0" in err
    err = _error_line(capsys, ["export", str(trained_run), "--out", str(tmp_path / "c"), "--defect-span", "2"])
    assert "--defect-span is for grid patches" in err
