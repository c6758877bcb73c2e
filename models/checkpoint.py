"""Run directories: everything needed to reload, resume or export a model, and nothing executable.

Layout of ``out_dir``:

* ``config.json`` — the whole ``RunConfig`` (model, training, data), so the directory alone rebuilds the model;
* ``model.pt`` — the ``JTrVAE`` state_dict (tensors only, loaded with ``weights_only=True``);
* ``optimizer.pt`` — Pyro's Adam state per parameter, for ``fit(..., resume=True)``;
* ``history.json`` and ``loss.csv`` — one row per finished epoch; ``loss.png`` — the loss curves;
* ``state.json`` — ``{"epoch": n}``, the number of finished epochs (the next epoch to run, 0-based), and
  ``"kept_epoch": k`` when ``train.keep = "best_val"`` left the weights of epoch ``k`` (0-based) in ``model.pt``;
* ``last.pt`` — only then: the last epoch's weights, which ``resume`` continues from (the optimiser state and the
  epoch count are the last epoch's; continuing from the kept weights with them would mix two points of the run).

Files are written to a temporary name and renamed, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.config import ModelConfig, RunConfig
from models.jtrvae import JTrVAE

__all__ = [
    "CheckpointError",
    "TrainingState",
    "load_config",
    "load_diagnosis",
    "load_last_weights",
    "load_run",
    "load_training_state",
    "plot_history",
    "rename_classes",
    "save_run",
]

_HISTORY_FIELDS = ("epoch", "loss", "val_loss", "beta1", "beta2", "beta3", "seconds")


class CheckpointError(ValueError):
    """A run directory that is missing files or does not fit the request; the message says which and what to do."""


@dataclass(frozen=True)
class TrainingState:
    """What a run needs to continue besides its weights."""

    epoch: int  # finished epochs = the next 0-based epoch to run
    history: list[dict]
    optimizer: dict | None  # Pyro optimiser state (PyroOptim.get_state), None when the run saved none
    kept_epoch: int | None = None  # train.keep "best_val": the epoch whose weights model.pt holds


def _on_host(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights detached and on the CPU, as a run directory stores them whatever device trained them."""
    return {k: v.detach().cpu() for k, v in weights.items()}


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _history_csv(history: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_HISTORY_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in _HISTORY_FIELDS})
    return buf.getvalue()


def plot_history(history: list[dict], path: Path) -> None:
    """Training and validation loss per epoch, as a PNG.

    Drawn on a bare ``matplotlib.figure.Figure`` (it renders PNG itself, with no display), never through pyplot:
    calling ``fit`` from a notebook must not switch the user's backend or leave a figure open in their session.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["loss"] for r in history], label="train")
    val = [(r["epoch"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if val:
        ax.plot([e for e, _ in val], [v for _, v in val], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per image")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write_bytes(path, buf.getvalue())


def save_run(
    out_dir: str | Path,
    model: JTrVAE,
    cfg: RunConfig,
    *,
    epoch: int,
    history: list[dict],
    optimizer_state: dict | None = None,
    diagnosis: dict | None = None,
    kept_epoch: int | None = None,
    last_weights: dict[str, Tensor] | None = None,
) -> None:
    """Write (or overwrite) the run directory; ``epoch`` is the number of finished epochs.

    ``diagnosis`` (the class-collapse diagnosis at the end of training) goes to ``diagnosis.json``, which
    ``atomstream export`` reads to refuse a collapsed model and copies into the manifest. ``kept_epoch`` goes to
    ``state.json``: the weights are then not the last epoch's, and a reader of the run (or ``fit_distributed``,
    which reads back what rank 0 wrote) must be able to tell; ``last_weights``, the last epoch's, go to ``last.pt``
    for a resume. A save without them removes an older ``last.pt``: it would no longer be the last epoch's.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out / "model.pt", _torch_bytes(_on_host(model.state_dict())))
    if last_weights is not None:
        _atomic_write_bytes(out / "last.pt", _torch_bytes(_on_host(last_weights)))
    else:
        (out / "last.pt").unlink(missing_ok=True)
    if optimizer_state is not None:
        _atomic_write_bytes(out / "optimizer.pt", _torch_bytes(optimizer_state))
    _atomic_write_text(out / "config.json", cfg.model_dump_json(indent=2) + "\n")
    _atomic_write_text(out / "history.json", json.dumps(history, indent=1) + "\n")
    _atomic_write_text(out / "loss.csv", _history_csv(history))
    if history:
        plot_history(history, out / "loss.png")
    kept = {} if kept_epoch is None else {"kept_epoch": int(kept_epoch)}
    _atomic_write_text(out / "state.json", json.dumps({"epoch": int(epoch), **kept}) + "\n")
    if diagnosis is not None:
        _atomic_write_text(out / "diagnosis.json", json.dumps(diagnosis, indent=1) + "\n")


def load_diagnosis(run_dir: str | Path) -> dict | None:
    """The run's class diagnosis (``diagnosis.json``), or ``None`` for a run without classes or from before it."""
    path = Path(run_dir) / "diagnosis.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a run directory written by `atomstream train` (models.fit)")
    data = json.loads(path.read_text())
    model = data.get("model")
    if isinstance(model, dict) and model.get("n_classes", 0) > 0 and "class_head" not in model:
        # A run saved before the invariant class head existed read its class from the pixel trunk: load it as such.
        model["class_head"] = "pixels"
    if isinstance(model, dict) and "class_quantiles" not in model:
        # ... and one saved before the intensity quantiles read only the spectral invariants.
        model["class_quantiles"] = 0
    if isinstance(model, dict) and "class_moments" not in model:
        # ... and one saved before the intensity moments read none (its quantiles, if any, are in its config).
        model["class_moments"] = 0
    return RunConfig.model_validate(data)


def rename_classes(run_dir: str | Path, names: tuple[str, ...]) -> RunConfig:
    """Rewrite the run's ``config.json`` with new class names; the weights do not depend on them."""
    cfg = load_config(run_dir)
    model = ModelConfig.model_validate({**cfg.model.model_dump(), "class_names": names})
    cfg = cfg.model_copy(update={"model": model})
    _atomic_write_text(Path(run_dir) / "config.json", cfg.model_dump_json(indent=2) + "\n")
    return cfg


def load_run(run_dir: str | Path, *, device: str = "cpu") -> tuple[JTrVAE, RunConfig]:
    """The trained model (in eval mode, on ``device``, in the run's float precision) and its full config."""
    cfg = load_config(run_dir)
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the run directory has a config but no weights; train it first")
    state = torch.load(path, map_location=device, weights_only=True)
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    model = JTrVAE(cfg.model).to(device=device, dtype=dtype)
    model.load_state_dict(state)
    model.eval()
    return model, cfg


def load_last_weights(run_dir: str | Path, *, device: str = "cpu") -> dict[str, Tensor] | None:
    """The last epoch's weights where ``model.pt`` holds a kept earlier epoch's (``last.pt``), else None."""
    path = Path(run_dir) / "last.pt"
    return torch.load(path, map_location=device, weights_only=True) if path.is_file() else None


def load_training_state(run_dir: str | Path, *, device: str = "cpu") -> TrainingState:
    """What ``fit(..., resume=True)`` needs besides the weights: finished epochs, history, optimiser state."""
    run = Path(run_dir)
    state_path = run / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} not found: nothing to resume in {run}; train without resume first")
    saved = json.loads(state_path.read_text())
    epoch, kept = int(saved["epoch"]), saved.get("kept_epoch")
    history_path = run / "history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    opt_path = run / "optimizer.pt"
    optimizer = torch.load(opt_path, map_location=device, weights_only=True) if opt_path.is_file() else None
    return TrainingState(
        epoch=epoch, history=history, optimizer=optimizer, kept_epoch=None if kept is None else int(kept)
    )
