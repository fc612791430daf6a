"""Token-preserving connectors: one output token per input feature."""

import torch
import torch.nn.functional as F
from torch import nn


class LinearConnector(nn.Module):
    """A single linear projection (LLaVA-1.0)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return self.linear(x)


class MLPConnector(nn.Module):
    """Two-layer GELU MLP (LLaVA-1.5 ``mlp2x_gelu``)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return self.linear_2(F.gelu(self.linear_1(x)))


CONNECTORS = {"linear": LinearConnector, "mlp": MLPConnector}
