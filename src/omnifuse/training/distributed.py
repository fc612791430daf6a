"""The processes of a run: one, or several under torchrun (one per device), replicated (DDP) or
sharded (FSDP: ``torch.distributed.fsdp.fully_shard``).

torchrun names each process by the environment variables ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; without them the run is a world of one and every collective is the identity. The
process group's backend follows the training device: NCCL for CUDA tensors, gloo for CPU tensors.

FSDP shards every layer of every stack (the encoders', the decoder's, the cross-attention blocks)
as one unit and the rest of the model as the root unit. Each process keeps 1/N of the
parameters, gradients and optimizer state. A unit's parameters are gathered for its forward and
backward, and its gradients are reduce-scattered after its backward.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["World", "full_state_dict", "gradient_sync", "is_sharded", "setup_world"]


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

    def wrap(self, model: nn.Module, strategy: str = "ddp") -> nn.Module:
        """The module that trains: ``model`` itself in a world of one, else DDP around it, or,
        with ``strategy`` fsdp, ``model`` sharded in place (its parameters become DTensors: build
        the optimizer after this)."""
        if self.size == 1:
            return model
        if strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.size,))
            for name, module in model.named_modules():
                if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "global_layers"):
                    for layer in module:
                        fully_shard(layer, mesh=mesh)
            for block in getattr(getattr(model, "decoder", None), "cross_layers", {}).values():
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
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


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by ``World.wrap(..., "fsdp")``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def gradient_sync(module: nn.Module, sync: bool) -> AbstractContextManager:
    """For the micro-batches before a step's last, gradients are only accumulated, and the last
    backward reduces the sum: DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)
    elif not sync and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return nullcontext()


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded module's whole state dict on the CPU, on rank 0 (None on the others); every
    process must call it (the shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if torch_dist.get_rank() == 0 else None
