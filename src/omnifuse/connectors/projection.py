"""Token-preserving connectors: one output token per input feature.

A connector's ``crop_tokens(config, grid, extra)`` is the number of tokens it makes of one crop's
features (a ``grid`` of patches plus ``extra`` class tokens), a pure function of the config: the
processor's token counts, and so the prompt layout and every cost figure, come from it
(ARCHITECTURE.md, contract 2). A compressing connector overrides it."""

import math

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
        """Add a crop's positions. A square crop whose patch grid was average-pooled k x k before
        the connector (a video frame, ``video.spatial_pool``) takes the positions pooled the same
        way: each pooled token sits where the patches it averages sat."""
        pe = self.position_embedding
        if pe is None:
            return y
        n, p = y.shape[-2], pe.shape[0]
        side, pooled = math.isqrt(p), math.isqrt(n)
        if n != p and side * side == p and pooled * pooled == n and 0 < pooled < side and side % pooled == 0:
            grid = pe.T.reshape(1, pe.shape[1], side, side)
            pe = F.avg_pool2d(grid, side // pooled).reshape(pe.shape[1], n).T
        if n != pe.shape[0]:
            raise ValueError(f"connector position embedding has {p} positions but a crop gave {n} tokens")
        return y + pe


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
