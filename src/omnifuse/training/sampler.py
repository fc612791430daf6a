"""Which records each optimizer step reads: the data position as a pure function of the step.

Every optimizer step consumes a fixed global batch of ``batch_size x world_size x grad_accum``
records, drawn from a per-epoch permutation seeded by ``seed``, so resuming at step s reads exactly
what an uninterrupted run would, and any number of processes splits the same global batch.
"""

from __future__ import annotations

import torch

__all__ = ["StepSampler"]


class StepSampler:
    def __init__(self, num_records: int, seed: int, batch_size: int, grad_accum: int = 1,
                 world_size: int = 1, rank: int = 0) -> None:
        self.num_records, self.seed = num_records, seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self._epoch: tuple[int, torch.Tensor] | None = None  # the last permutation drawn

    @property
    def global_batch(self) -> int:
        """Records per optimizer step, over all processes and micro-batches."""
        return self.batch_size * self.grad_accum * self.world_size

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (record indices) of optimizer step ``step`` (0-based)."""
        rows = []
        for j in range(self.global_batch):
            epoch, pos = divmod(step * self.global_batch + j, self.num_records)
            rows.append(int(self._permutation(epoch)[pos]))
        # Row j of the global batch goes to process (j // batch_size) % world, in micro-batch order.
        mine = [r for j, r in enumerate(rows) if (j // self.batch_size) % self.world_size == self.rank]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.num_records, generator=g))
        return self._epoch[1]
