"""Token-preserving connectors: one output token per input feature.

A connector's ``crop_tokens(config, grid, extra)`` is the number of tokens it makes of one crop's
features (a ``grid`` of patches plus ``extra`` class tokens), a pure function of the config: the
processor's token counts, and so the prompt layout and every cost figure, come from it
(ARCHITECTURE.md, contract 2). A compressing connector overrides it."""

import torch
import torch.nn.functional as F
from torch import nn


class _Positions(nn.Module):
    """Optional learned position per token of a crop, added to the connector's output."""

    @staticmethod
    def crop_tokens(config, grid: tuple[int, int], extra: int) -> int:
        return grid[0] * grid[1] + extra  # one token per feature

    def _init_positions(self, positions: int, out_dim: int) -> None:
        self.position_embedding = nn.Parameter(torch.zeros(positions, out_dim)) if positions else None

    def _add_positions(self, y: torch.Tensor) -> torch.Tensor:  # (..., N, out_dim)
        if self.position_embedding is None:
            return y
        if y.shape[-2] != self.position_embedding.shape[0]:
            raise ValueError(f"connector position embedding has {self.position_embedding.shape[0]} positions "
                             f"but a crop gave {y.shape[-2]} tokens")
        return y + self.position_embedding


class LinearConnector(_Positions):
    """A single linear projection (LLaVA-1.0)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, positions: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)
        self._init_positions(positions, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, in_dim) -> (..., N, out_dim)
        return self._add_positions(self.linear(x))


class MLPConnector(_Positions):
    """Two-layer GELU MLP (LLaVA-1.5 ``mlp2x_gelu``)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, positions: int = 0) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self._init_positions(positions, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., N, in_dim) -> (..., N, out_dim)
        return self._add_positions(self.linear_2(F.gelu(self.linear_1(x))))


CONNECTORS = {"linear": LinearConnector, "mlp": MLPConnector}
