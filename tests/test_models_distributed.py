"""Multi-process training: two real gloo ranks on loopback (DistributedDataParallel) train exactly what one process
computes for the same global batches, and `atomstream train --nproc 2` writes one run from rank 0.

Why the reference is ``fit(..., steps=ShardedSteps(2))`` and not plain ``fit`` at twice the batch: the ELBO is a Monte
Carlo estimate, and a random stream cannot be split between processes so that every image gets the draw it gets in
one process; both sharded plans draw each shard from its own ``(seed, step, shard)`` generator (``models.shards``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from test_models_train import _blobs
from torch import nn

from atomstream.cli import main
from atomstream.cli.train import training_threads
from models.config import ModelConfig, RunConfig, TrainConfig
from models.distributed import fit_distributed
from models.jtrvae import JTrVAE
from models.shards import ShardedSteps, shard_of, unsynchronised_params
from models.train import fit

TINY = ModelConfig(patch=(12, 12), n_classes=2, latent_dim=2, encoder_hidden=(16,), decoder_hidden=(16, 16))


def test_two_gloo_processes_train_what_one_process_computes(tmp_path: Path) -> None:
    # 37 images, 4 held out: 33 per epoch in global batches of 2 x 8 = 16, 16 and 1 (rank 1's shard of the last is
    # empty). The two runs differ only in the order the shards' gradients are added. float64, because Adam divides by
    # √v + 1e-8: a gradient that is pure rounding noise (float32: ~1e-7 of its summands) could move a weight by up to
    # the learning rate, while float64 noise (~1e-16) stays far below that epsilon.
    # keep "best_val": epoch 1 is the only one after the β ramp, so the weights are the last epoch's either way, and
    # the kept epoch must come back from the run rank 0 wrote
    train = TrainConfig(epochs=2, batch_size=8, progress=False, dtype="float64", device="cpu", keep="best_val")
    cfg = RunConfig(model=TINY, train=train)
    x = _blobs(37, 0, size=12)
    training_threads()  # one torch thread here, as in every rank, so the warm start rounds alike (conftest restores)
    ddp = fit_distributed(cfg, x, tmp_path / "run", nproc=2, worker_setup=training_threads)  # 1 thread, as here
    pyro.clear_param_store()
    one = fit(cfg, x, None, steps=ShardedSteps(2))
    pyro.set_rng_seed(cfg.train.seed)
    start = JTrVAE(TINY).to(torch.float64).decoder.state_dict()  # fit's initial decoder (the warm start moves none)

    got, want = ddp.model.state_dict(), one.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        # rounding: the tolerance is 1e-10; measured here 3.5e-17 after 6 Adam steps (summation order only)
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-10), name
    assert max(float((want[f"decoder.{k}"] - v).abs().max()) for k, v in start.items()) > 1e-3  # it trained
    for a, b in zip(ddp.history, one.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-12)
    assert json.loads((tmp_path / "run" / "state.json").read_text()) == {"epoch": 2, "kept_epoch": 1}
    assert ddp.kept_epoch == one.kept_epoch == 1
    for key, value in one.diagnosis.items():
        assert ddp.diagnosis[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float | list) else value)


def test_shards_are_disjoint_and_make_up_the_global_batch() -> None:
    block = torch.arange(11)
    shards = [shard_of(block, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))
    assert shard_of(torch.arange(1), 1, 2).numel() == 0


def test_a_pyro_param_outside_the_wrapped_module_is_named() -> None:
    net = nn.Linear(2, 2)
    pyro.module("net", net)
    assert unsynchronised_params(net) == []
    pyro.param("stray", torch.zeros(2))
    assert unsynchronised_params(net) == ["stray"]


def test_cli_trains_on_two_processes_and_rank_zero_writes_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = np.arange(24) % 2
    images = np.zeros((24, 12, 12), np.float32)
    images[labels == 0, 3:9, 5:7] = 1.0
    images[labels == 1, 5:7, 2:10] = 1.0
    data = tmp_path / "tiny.npz"
    np.savez(data, images=images, labels=labels)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--classes", "2", "--hidden", "16", "--epochs", "1", "--batch-size", "4"]
    # gloo on the CPU: on a one-GPU machine `auto` means CUDA, where two processes need two GPUs and train refuses
    argv += ["--device", "cpu"]
    assert main([*argv, "--nproc", "2", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training on 2 processes" in printed and "2 x 4 = 8 patches per step" in printed
    assert printed.count("trained jtrVAE") == 1
    assert json.loads((out / "state.json").read_text()) == {"epoch": 1}
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert main([*argv, "--nproc", "0", "--out", str(tmp_path / "other")]) == 2
    assert "--nproc 0" in capsys.readouterr().err
