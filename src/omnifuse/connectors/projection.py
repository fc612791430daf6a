"""Token-preserving connectors: one output token per input feature (LLaVA)."""

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.connectors.base import Connector


class LinearConnector(Connector):
    """A single linear projection (LLaVA-1.0)."""

    preserves_tokens = True

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        return tokens

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, positions: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)
        self._init_positions(positions, out_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self._add_positions(self.linear(x))  # (..., N, in_dim) -> (..., N, out_dim)


class MLPConnector(Connector):
    """Two-layer GELU MLP (LLaVA-1.5 ``mlp2x_gelu``)."""

    preserves_tokens = True

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        return tokens

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, positions: int = 0) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self._init_positions(positions, out_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self._add_positions(self.linear_2(F.gelu(self.linear_1(x))))  # (..., N, in) -> (..., N, out)
