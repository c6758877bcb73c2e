"""Multi-process training: ``fit`` on N local processes (``fit_distributed``) or on ranks started by ``torchrun``
(``fit_torchrun_rank``), each a rank of one ``torch.distributed`` process group running
``models.shards.DataParallelSteps`` (DistributedDataParallel; gloo on CPU, NCCL on CUDA).

Why ``torch.multiprocessing.spawn`` for N local processes: one command does it all (no launcher, no environment to
set), the patches are read and cut once, in the parent, and reach the ranks through shared memory (a torch tensor
handed to ``spawn`` travels as a handle to the parent's storage), and errors come back as the parent's exceptions.
``spawn``, not ``fork``: a fork of a process that has started OpenMP or CUDA threads can hang, and CUDA forbids it.
The ranks meet through a file in a temporary directory (``file://`` rendezvous), so there is no port to pick and
race for. ``torchrun`` is supported as well, for several machines: it starts the ranks and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT``, and every rank reads its own data.

Rank 0 alone writes the run directory and draws the progress bar; every rank evaluates the validation loss, which
comes out identical (same weights, the loss's own seed), so the history is the same on every rank.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from models.checkpoint import CheckpointError, load_diagnosis, load_run, load_training_state
from models.config import RunConfig
from models.shards import DataParallelSteps
from models.train import FitError, TrainResult, fit, resolve_device

__all__ = ["fit_distributed", "fit_torchrun_rank", "process_group", "torchrun_world"]

#: the errors of ``fit`` that are the user's to fix: a rank reports them to the parent, which raises them again
_USER_ERRORS: dict[str, type[Exception]] = {"FitError": FitError, "CheckpointError": CheckpointError}


def torchrun_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when this process is a rank of a ``torchrun`` launch of more than one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


@contextmanager
def process_group(
    rank: int, world_size: int, *, init_method: str, device: str, local_rank: int | None = None
) -> Iterator[torch.device]:
    """The default process group for the duration of the block; yields this rank's device.

    gloo on CPU; on CUDA, NCCL with the rank's own GPU (``local_rank``, default ``rank``) made current, so ``fit``'s
    ``device="cuda"`` lands on it.
    """
    where = resolve_device(device)
    backend = "gloo"
    if where.type == "cuda":
        index = rank if local_rank is None else local_rank
        if index >= torch.cuda.device_count():
            raise FitError(
                f"rank {rank} needs GPU {index} but this machine has {torch.cuda.device_count()}; start at most that "
                "many processes per machine, or train on the CPU (device 'cpu')"
            )
        torch.cuda.set_device(index)
        where, backend = torch.device("cuda", index), "nccl"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        yield where
    finally:
        dist.destroy_process_group()


def fit_torchrun_rank(
    cfg: RunConfig, images: np.ndarray | Tensor, out_dir: str | Path | None, *, resume: bool = False
) -> TrainResult:
    """``fit`` as this ``torchrun`` rank (``torchrun_world()`` must not be None); every rank returns the result."""
    world = torchrun_world()
    if world is None:
        raise FitError("fit_torchrun_rank runs under torchrun (WORLD_SIZE > 1 and RANK set); use fit otherwise")
    rank, size, local = world
    with process_group(rank, size, init_method="env://", device=cfg.train.device, local_rank=local):
        return fit(cfg, images, out_dir, resume=resume, steps=DataParallelSteps())


def _rank(
    rank: int,
    world_size: int,
    init_method: str,
    cfg: RunConfig,
    images: Tensor,
    val_images: Tensor | None,
    out_dir: Path,
    resume: bool,
    setup: Callable[[], object] | None,
    errors: mp.SimpleQueue,
) -> None:
    """One spawned rank. A user error goes back to the parent through ``errors`` and the rank ends quietly: ``fit``'s
    errors arise alike on every rank (same inputs, the loss reduced over ranks), and should one arise on a rank alone,
    its peers' next collective fails on the closed connection, which ``start_processes`` reports to the parent."""
    if setup is not None:
        setup()
    try:
        with process_group(rank, world_size, init_method=init_method, device=cfg.train.device):
            fit(cfg, images, out_dir, val_images=val_images, resume=resume, steps=DataParallelSteps())
    except tuple(_USER_ERRORS.values()) as exc:
        errors.put((type(exc).__name__, str(exc)))


def _shared(images: np.ndarray | Tensor) -> Tensor:
    """The images as a torch-owned tensor in shared memory, so the ranks read the parent's copy."""
    x = images.clone() if isinstance(images, Tensor) else torch.from_numpy(np.array(images))
    return x.share_memory_()


def fit_distributed(
    cfg: RunConfig,
    images: np.ndarray | Tensor,
    out_dir: str | Path | None,
    *,
    nproc: int,
    val_images: np.ndarray | Tensor | None = None,
    resume: bool = False,
    worker_setup: Callable[[], object] | None = None,
) -> TrainResult:
    """``fit`` on ``nproc`` local processes with DistributedDataParallel; ``nproc=1`` is plain ``fit``.

    ``cfg.train.batch_size`` is each process's batch: a step takes ``nproc × batch_size`` images, and the run
    equals ``fit(..., steps=ShardedSteps(nproc))`` in one process to rounding (``models.shards``). The result is
    read back from the run directory rank 0 wrote (a temporary one when ``out_dir`` is None). ``worker_setup``, a
    picklable function, runs first in every rank: the place for process-wide settings such as torch's thread count,
    which library code leaves to its caller.
    """
    if nproc < 1:
        raise FitError(f"nproc={nproc}: give the number of processes to train on, at least 1")
    if nproc == 1:
        return fit(cfg, images, out_dir, val_images=val_images, resume=resume)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise FitError(
            f"nproc={nproc} CUDA processes need a GPU each, and this machine has {torch.cuda.device_count()}; start at "
            "most that many, or train on the CPU (device 'cpu')"
        )
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="atomstream-ddp-") as tmp:
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp) / "run"
        val = None if val_images is None else _shared(val_images)
        args = (nproc, f"file://{tmp}/rendezvous", cfg, _shared(images), val, run_dir, resume, worker_setup, errors)
        try:
            mp.start_processes(_rank, args=args, nprocs=nproc, join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            if errors.empty():  # not the user's to fix: the rank's traceback is in the exception
                raise
        if not errors.empty():
            kind, message = errors.get()
            raise _USER_ERRORS[kind](message) from None
        model, _ = load_run(run_dir)  # on the CPU, as fit hands its model back
        state = load_training_state(run_dir)
        return TrainResult(
            model=model,
            history=state.history,
            diagnosis=load_diagnosis(run_dir),
            epochs=cfg.train.epochs,
            kept_epoch=state.kept_epoch,
        )
