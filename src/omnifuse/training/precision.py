"""The float type a run computes in: float32, or mixed precision in bfloat16 / float16.

Mixed precision as in Micikevicius et al. 2018 ("Mixed Precision Training") and ``torch.autocast``:
the weights, their gradients, AdamW's moments, checkpoints and the loss stay float32; the matrix
products and attention of each forward pass run in ``dtype``. Keeping float32 master weights
matters for training: an AdamW update is about ``lr`` times a weight's scale, and at the small
learning rates of fine-tuning (1e-5 .. 1e-4) it falls below bfloat16's resolution (8 bits of
mantissa), so bfloat16 weights would not move. bfloat16 has float32's range and needs nothing
more; float16 (CUDA only) scales the loss so that small gradients do not underflow, and skips the
step whose gradients overflowed (``torch.amp.GradScaler``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from omnifuse.runtime import DTYPES

__all__ = ["Precision"]


@dataclass
class Precision:
    device: torch.device
    dtype: torch.dtype  # the forward passes' compute type
    scaler: torch.amp.GradScaler | None = None  # float16: the loss scale

    @classmethod
    def for_run(cls, device: torch.device, dtype: str) -> Precision:
        compute = DTYPES[dtype]
        scaler = torch.amp.GradScaler(device.type) if compute == torch.float16 else None
        return cls(device, compute, scaler)

    def autocast(self) -> AbstractContextManager:
        """The context of a forward pass (float32: none at all, the plain float32 pass)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
