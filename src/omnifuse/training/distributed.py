"""The processes of a run: one, or several under torchrun (one per device, DDP).

torchrun names each process by the environment variables ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; without them the run is a world of one and every collective is the identity. The
process group's backend follows the training device: NCCL for CUDA tensors, gloo for CPU tensors.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["World", "gradient_sync", "setup_world"]


@dataclass(frozen=True)
class World:
    size: int  # processes in the run
    rank: int  # this process, 0 .. size - 1
    device: torch.device  # this process's device (cuda:LOCAL_RANK under torchrun on GPUs)
    owns_group: bool = False  # this process started the process group, so it also ends it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that evaluates, logs and writes checkpoints."""
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every process, in place (a tensor on ``device``)."""
        if self.size > 1:
            torch_dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.size > 1:
            torch_dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that trains: ``model`` itself in a world of one, else DDP around it."""
        if self.size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Rows without images leave the encoder unused in some steps.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def close(self) -> None:
        """End the process group this process started (a caller's own group is left alone)."""
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup_world(device: str) -> World:
    """This process's place in the run, joining the process group under torchrun. ``device``:
    "cpu" or "cuda" (each process then takes the GPU of its local rank)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if where.type == "cuda":
        torch.cuda.set_device(where)
    owns = False
    if size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
        owns = True
    return World(size, rank, where, owns)


def gradient_sync(module: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` for the micro-batches before a step's last (their gradients are only
    accumulated; the last backward all-reduces the sum), nothing otherwise."""
    if not sync and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return nullcontext()
