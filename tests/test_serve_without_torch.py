"""The serving install has no torch: ``atomstream serve`` with an ONNX artifact on the CPU runs end to end in a
process where importing torch is impossible, and publishes the maps the torch path computes.

The artifact is exported here (training and export need torch); the child process sets ``sys.modules["torch"] =
None`` before anything else is imported, so any ``import torch`` on its way — ours or a library's — raises. It then
runs the real command; this process replays real frames into it over loopback and subscribes to its maps, which
must equal ``Pipeline.process`` here (the same numpy path) and, within float32 rounding of two FFT and convolution
libraries, the torch path: the same frames through the torch variants of every step (tensors, ``unfold``,
``torch.fft``, ``conv2d``/``max_pool2d``), as they run on a GPU.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from artifact_factory import make_artifact

from sim.lattice import LatticeConfig, synth_frame
from sim.replay import Replayer
from streamer.maps.atoms import _find
from streamer.maps.encoder import load
from streamer.maps.pipeline import FrameMaps, Pipeline, PreparedFrame
from streamer.maps.preprocess import Preprocessing, _normalise
from streamer.maps.tiling import gather_points, tile_grid
from streamer.wire.client import Subscriber

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60.0
NO_TORCH = "import sys\nsys.modules['torch'] = None  # every `import torch` (or torch.x) now raises ImportError\n"


def _run_without_torch(code: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATOMSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", NO_TORCH + code, *args], cwd=ROOT, env=env, text=True, **popen)


def test_the_blocker_works_and_every_streamer_module_and_the_cli_import_without_torch() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "streamer").rglob("*.py")
        if p.stem != "__init__"
    )
    code = (
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch imported')\n"
        + "".join(f"import {m}\n" for m in [*modules, "atomstream.cli", "atomstream.cli.serve"])
        + "assert sys.modules['torch'] is None\n"
    )
    proc = _run_without_torch(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


def test_what_needs_torch_says_so_and_what_to_install(tmp_path: Path) -> None:
    """TorchScript and a CUDA device need torch; without it, ``load`` names the need and the install that meets it."""
    artifact = make_artifact(tmp_path / "artifact")
    code = (
        "from streamer.maps.arrays import TorchMissingError\n"
        "from streamer.maps.encoder import load\n"
        "try:\n    load(sys.argv[1], backend='torchscript', device='cpu')\n"
        "except TorchMissingError as exc:\n    print(exc)\n"
        "print(load(sys.argv[1], backend='onnx', device='cpu'))\n"
    )
    proc = _run_without_torch(code, str(artifact), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    refused, loaded = out.splitlines()
    assert refused.startswith("the TorchScript backend needs PyTorch, which is not installed: pip install")
    assert loaded == "Encoder(test-encoder 0.0.1, onnx on cpu, patch 16x16)"


def _scan() -> list[np.ndarray]:
    """Odd shapes and the common detector dtypes, as in the live-equals-offline test."""
    a, _ = synth_frame(LatticeConfig(shape=(97, 130), n_defects=3), seed=1)
    b, _ = synth_frame(LatticeConfig(shape=(130, 97), n_defects=1, kind="hexagonal"), seed=2)
    scaled = (a - a.min()) / (np.ptp(a) or 1.0)
    return [a.astype(np.float32), (scaled * 60000).astype(np.uint16), b.astype(np.float64)]


def _torch_path(pipe: Pipeline, frame: np.ndarray) -> FrameMaps:
    """``pipe`` on ``frame`` with every step in torch (its GPU path, here on CPU tensors): the reference of before."""
    spec, tiling = pipe.manifest.preprocessing, pipe.manifest.tiling
    x = torch.from_numpy(frame.astype(np.float32))
    grid, centers = None, None
    if pipe.layout == "grid":
        tiles = tile_grid(_normalise(x, spec), pipe.patch, pipe.stride, pipe.origin)
        grid = (int(tiles.shape[0]), int(tiles.shape[1]))
    else:
        found = _find(x, tiling.atom_sigma, tiling.atom_min_distance, tiling.atom_threshold, True, "all")
        tiles, kept = gather_points(_normalise(x, spec), found, pipe.patch)
        centers = found[kept].numpy()
    assert isinstance(tiles, torch.Tensor)
    prepared = PreparedFrame(
        tiles=tiles, spec=spec, grid=grid, centers=centers, frame_shape=(frame.shape[0], frame.shape[1]), tile_s=0.0
    )
    patches = prepared.patches
    assert isinstance(patches, torch.Tensor)  # the encoder gets a tensor, and gives tensors back
    return pipe.assemble(prepared, pipe.encode(patches))


def _served_without_torch(artifact: Path, frames: list[np.ndarray]) -> dict[int, Any]:
    """``atomstream serve`` in a torch-blocked child: the maps it publishes for ``frames``, by frame id."""
    argv = [
        "from atomstream.cli import main\nsys.exit(main())",
        "serve", "--artifact", str(artifact), "--backend", "onnx", "--device", "auto",
        "--ingest", "tcp://127.0.0.1:0", "--publish", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0",
        "--metrics-port", "none", "--status-interval-s", "0.05", "--defect-threshold", "0.3", "--log-level", "ERROR",
    ]  # fmt: skip
    proc = _run_without_torch(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        readable, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
        line = proc.stdout.readline() if readable else ""
        if not line:
            proc.kill()
            raise AssertionError(f"serve printed no ready line: {proc.communicate(timeout=10)[1][-3000:]}")
        ready = json.loads(line)
        assert ready["event"] == "ready", ready
        assert ready["encoder"] == {"backend": "onnx", "device": "cpu", "providers": ["CPUExecutionProvider"]}, ready
        maps: dict[int, Any] = {}
        with Subscriber(ready["publish"], ("maps", "scan_summary")) as sub:
            status = sub.wait_connected(TIMEOUT_S)
            assert (status.backend, status.device) == ("onnx", "cpu")
            with Replayer(ready["ingest"], progress=False, scan_id="no-torch") as producer:
                producer.send_scan(frames)
            while (got := sub.recv(TIMEOUT_S)).topic != "scan_summary":
                maps[got.msg.frame_id] = got
        assert got.msg.frames_published == len(frames) and got.msg.frames_rejected == 0
        proc.send_signal(signal.SIGTERM)  # drains, prints its "stopped" line, exits 0
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1])["event"] == "stopped"
        return maps
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("layout", ["grid", "points"])
def test_serve_without_torch_publishes_the_maps_of_the_torch_path(
    tmp_path_factory: pytest.TempPathFactory, layout: Literal["grid", "points"]
) -> None:
    # the grid model takes FFT spectra, so numpy's FFT stands in for torch's; the points model exercises the atom finder
    spec = Preprocessing(fft="logmag", window="hann", patch_norm="minmax") if layout == "grid" else Preprocessing()
    artifact = make_artifact(
        tmp_path_factory.mktemp(f"no-torch-{layout}"), layout=layout, preprocessing=spec, stride=(7, 9), seed=5
    )
    frames = _scan()
    pipe = Pipeline(load(artifact, backend="onnx", device="cpu"), defect_threshold=0.3)
    served = _served_without_torch(artifact, frames)
    assert sorted(served) == list(range(len(frames)))
    for k, frame in enumerate(frames):
        live, here, on_torch = served[k], pipe.process(frame), _torch_path(pipe, frame)
        assert list(live.arrays) == list(here.arrays) == list(on_torch.arrays)
        if layout == "points":
            assert len(here.arrays["centers"]) > 10  # atoms were found
        for name, want in here.arrays.items():
            # the torch-free service computes exactly what the same numpy path computes in a process with torch
            np.testing.assert_allclose(live.arrays[name], want, atol=1e-6, err_msg=f"frame {k} {name}")
            # and what the torch path computes, within float32 rounding (FFT, smoothing)
            if name != "class":
                np.testing.assert_allclose(on_torch.arrays[name], want, atol=1e-4, err_msg=f"frame {k} {name}")
        prob = np.sort(here.arrays["class_prob"], axis=-1)
        clear = prob[..., -1] - prob[..., -2] > 1e-3  # the argmax of a near-tie may go either way
        np.testing.assert_array_equal(on_torch.arrays["class"][clear], here.arrays["class"][clear])
