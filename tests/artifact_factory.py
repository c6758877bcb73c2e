"""Real artifacts for tests, without training: a seeded, untrained JTrVAE exported through the real exporter.

Parity is still measured (on seeded uniform random patches, as the manifest says), so every artifact made here has
passed the same checks as a production export. Use it from a module-scoped fixture::

    @pytest.fixture(scope="module")
    def artifact(tmp_path_factory):
        return make_artifact(tmp_path_factory.mktemp("artifact"))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from exporters.export import export_model
from exporters.verify import parity_patches
from models.config import DataConfig, ModelConfig, RunConfig
from models.jtrvae import JTrVAE
from streamer.maps.novelty import NoveltyKind
from streamer.maps.preprocess import Preprocessing

__all__ = ["make_artifact"]


def make_artifact(
    tmp_dir: str | Path,
    *,
    patch: tuple[int, int] = (16, 16),
    n_classes: int = 3,
    latent_dim: int = 2,
    rotation: bool = True,
    translation: bool = False,
    preprocessing: Preprocessing = Preprocessing(),  # noqa: B008 — frozen pydantic, safe as a default
    layout: Literal["grid", "points"] = "grid",
    stride: tuple[int, int] = (8, 8),
    origin: tuple[int, int] = (0, 0),
    seed: int = 0,
    name: str = "test-encoder",
    version: str = "0.0.1",
    class_names: Sequence[str] | None = None,
    defect_classes: Sequence[int] = (),
    encoder_hidden: tuple[int, ...] = (64, 64),
    fp16: bool = False,
    calibrate_on: np.ndarray | None = None,
    defect_score: NoveltyKind = "joint",
) -> Path:
    """Export a seeded untrained model to ``tmp_dir`` (created if needed) and return that artifact directory.

    Same arguments, same weights and outputs (the seed is applied inside ``torch.random.fork_rng``, so the global
    RNG of the calling test is left as it was). ``calibrate_on`` (frames ``(F, H, W)``) are cut as the data config
    says and calibrate the defect score of kind ``defect_score`` (``exporters.calibrate``); without them the manifest
    has no statistics.
    """
    model_cfg = ModelConfig(
        patch=patch,
        n_classes=n_classes,
        latent_dim=latent_dim,
        rotation=rotation,
        translation=translation,
        encoder_hidden=encoder_hidden,
        decoder_hidden=(16,),
        class_names=None if class_names is None else tuple(class_names),
    )
    data = DataConfig(
        kind="atoms" if layout == "points" else "grid",
        patch=patch,
        stride=stride,
        origin=origin,
        preprocessing=preprocessing,
    )
    run = RunConfig(model=model_cfg, data=data, name=name, version=version)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JTrVAE(model_cfg).eval()
    patches, described, _ = parity_patches(run, seed=seed)
    novelty = None
    if calibrate_on is not None:
        from exporters.calibrate import calibrate_novelty
        from models.data import scan_patches

        novelty = calibrate_novelty(model, scan_patches(calibrate_on, data), kind=defect_score)
    out = Path(tmp_dir)
    export_model(
        model,
        run,
        out,
        parity_patches=patches,
        parity_data=described,
        fp16=fp16,
        defect_classes=tuple(defect_classes),
        novelty=novelty,
    )
    return out
