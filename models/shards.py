"""How one optimisation step of ``models.train.fit`` is spread: one process, shards in one process, or DDP ranks.

``fit`` asks its *step plan* five things — how many images a step takes, how to prepare the model, how to compute a
step's loss, how to add up an epoch's loss and whether this process is the one that writes — and otherwise runs the
same loop whatever the plan:

* :class:`SingleProcess` (the default) is ``fit`` as it always was: one batch per step, one random stream;
* :class:`ShardedSteps` cuts every *global* batch of ``shards × batch_size`` images into ``shards`` interleaved
  shards (``block[r::shards]``, the split ``torch.utils.data.DistributedSampler`` makes) and adds their losses in one
  process — gradient accumulation, and the single-process reference a data-parallel run is tested against;
* :class:`DataParallelSteps` is rank ``r`` of a process group: it computes shard ``r`` only, inside the forward of a
  module wrapped in :class:`torch.nn.parallel.DistributedDataParallel`, so the backward all-reduces every parameter's
  gradient (DDP's bucketed hooks, gloo on CPU, NCCL on CUDA) before Pyro's Adam steps.

Why the Monte Carlo draws are seeded per shard: the ELBO is estimated with one draw of every latent per image, and a
random stream cannot be split between processes so that each image gets the draw it would get in one process. Both
sharded plans therefore draw shard ``r`` of step ``t`` from its own generator, seeded by ``(seed, t, r)``; a DDP run
on N processes is then the same computation as ``ShardedSteps(N)`` in one, equal to rounding
(``tests/test_models_distributed.py``). Against plain ``fit`` at the same global batch it agrees in distribution only.

Why the loss is scaled by the world size: DDP averages gradients over ranks, while the ELBO here is a sum over
images; multiplying each rank's loss by N makes the all-reduced gradient the gradient of the global batch's sum,
exactly what one process would compute.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DataParallelSteps", "ShardedSteps", "SingleProcess", "shard_of", "unsynchronised_params"]

#: ``fit``'s loss: (model, guide, images, β, anchor target or None, anchor weight) -> a differentiable scalar
LossFn = Callable[..., Tensor]


def shard_of(block: Tensor, rank: int, shards: int) -> Tensor:
    """Shard ``rank`` of a global batch: rows ``rank, rank + shards, …`` (disjoint; together they are the block)."""
    return block[rank::shards]


def unsynchronised_params(module: nn.Module) -> list[str]:
    """Names of Pyro param-store entries that are not parameters of ``module``.

    DDP all-reduces the gradients of the module it wraps and nothing else: a ``pyro.param`` created outside the
    networks would train on each rank's shard alone and drift apart between ranks without any error.
    """
    own = {id(p) for p in module.parameters()}
    return sorted(name for name, p in pyro.get_param_store().named_parameters() if id(p) not in own)


@contextmanager
def _seeded(seed: int, step: int, shard: int, device: torch.device) -> Iterator[None]:
    """Torch's random stream seeded by ``(seed, step, shard)`` inside, and left as it was outside."""
    state = np.random.SeedSequence([seed, step, shard]).generate_state(2, dtype=np.uint32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        yield


class SingleProcess:
    """``fit`` as one process runs it: a batch is one step, the random stream is the one ``fit`` seeded."""

    world_size = 1
    is_main = True

    def global_batch(self, batch_size: int) -> int:
        """Images per optimisation step, over all processes."""
        return batch_size

    def prepare(self, model: nn.Module, anchor: Tensor | None, *, seed: int) -> Tensor | None:
        """Called once the model (and the class anchor, if any) is built; returns the anchor every rank uses."""
        return anchor

    def loss(self, loss_fn: LossFn, model: nn.Module) -> LossFn:
        """The loss ``SVI`` differentiates for one global batch."""
        return loss_fn

    def total(self, value: float) -> float:
        """An epoch's summed loss over all processes (each passes the sum over the steps it ran)."""
        return value


class ShardedSteps(SingleProcess):
    """Every global batch as ``shards`` shards of ``batch_size`` images, each with its own seeded random draws,
    their losses added in this one process (so their gradients are too)."""

    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards={shards}: give at least 1")
        self.shards = shards
        self.seed = 0
        self._steps: Iterator[int] = itertools.count()

    def global_batch(self, batch_size: int) -> int:
        return batch_size * self.shards

    def prepare(self, model: nn.Module, anchor: Tensor | None, *, seed: int) -> Tensor | None:
        self.seed, self._steps = seed, itertools.count()
        return anchor

    def loss(self, loss_fn: LossFn, model: nn.Module) -> LossFn:
        def sharded(model_fn: Callable, guide_fn: Callable, x: Tensor, beta: tuple, target: Tensor | None,
                    weight: float) -> Tensor:  # fmt: skip
            step = next(self._steps)
            total = x.new_zeros(())
            for rank in range(self.shards):
                xs = shard_of(x, rank, self.shards)
                if xs.shape[0] == 0:
                    continue
                ts = None if target is None else shard_of(target, rank, self.shards)
                with _seeded(self.seed, step, rank, x.device):
                    total = total + loss_fn(model_fn, guide_fn, xs, beta, ts, weight)
            return total

        return sharded


class _ShardLoss(nn.Module):
    """The module DDP wraps: its parameters are the model's; its forward is one shard's loss.

    The loss function arrives as an argument rather than being stored, so the module holds no closure.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: LossFn, *args: object) -> Tensor:
        return loss_fn(*args)


class DataParallelSteps(ShardedSteps):
    """Rank ``rank`` of the default process group (already initialised, ``models.distributed``): shard ``rank`` of
    every global batch, gradients all-reduced by DistributedDataParallel."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "DataParallelSteps needs a torch.distributed process group: run through models.distributed "
                "(atomstream train --nproc N, or torchrun)"
            )
        super().__init__(dist.get_world_size())
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.world_size = self.shards
        self._ddp: nn.Module | None = None
        self._device = torch.device("cpu")

    def prepare(self, model: nn.Module, anchor: Tensor | None, *, seed: int) -> Tensor | None:
        """Wrap the model in DDP (which broadcasts rank 0's weights and buffers) and use rank 0's class anchor, so
        every rank starts from the same state even if the warm start's clustering were not bit-reproducible."""
        super().prepare(model, anchor, seed=seed)
        device = self._device = next(model.parameters()).device
        ids = None
        if device.type == "cuda":  # NCCL: one device per rank, the one models.distributed made current
            ids = [device.index if device.index is not None else torch.cuda.current_device()]
        self._ddp = nn.parallel.DistributedDataParallel(_ShardLoss(model), device_ids=ids)
        if anchor is not None:
            dist.broadcast(anchor, src=0)
        return anchor

    def loss(self, loss_fn: LossFn, model: nn.Module) -> LossFn:
        if self._ddp is None:
            raise RuntimeError("call prepare(model, anchor, seed=...) before loss(...)")
        ddp, module = self._ddp, self._ddp.module

        def ranked(model_fn: Callable, guide_fn: Callable, x: Tensor, beta: tuple, target: Tensor | None,
                   weight: float) -> Tensor:  # fmt: skip
            step = next(self._steps)
            xs = shard_of(x, self.rank, self.shards)
            ts = None if target is None else shard_of(target, self.rank, self.shards)
            share = float(self.world_size)
            if xs.shape[0] == 0:  # a last, short global batch: this rank still joins the all-reduce, adding zero
                xs, ts, share = x[:1], None if target is None else target[:1], 0.0
            with _seeded(self.seed, step, self.rank, x.device):
                loss = ddp(loss_fn, model_fn, guide_fn, xs, beta, ts, weight)
            if step == 0 and (stray := unsynchronised_params(module)):
                raise RuntimeError(
                    f"Pyro params {stray} are not parameters of the model DDP wraps, so their gradients would not "
                    "be all-reduced; create them inside an nn.Module registered with pyro.module"
                )
            return loss * share

        return ranked

    def total(self, value: float) -> float:
        """The sum over ranks, divided by the world size the per-rank losses were scaled by."""
        t = torch.tensor([value], dtype=torch.float64, device=self._device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return float(t[0]) / self.world_size
