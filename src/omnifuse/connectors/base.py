"""What every connector is: a module from encoder features to decoder-width tokens, with a pure
count of the tokens it makes.

``num_output_tokens(config, tokens, grid)`` is the number of tokens a connector makes of one crop's
``tokens`` encoder features (a ``grid`` of (rows, cols) patches plus any class tokens; ``grid`` is
None when the features are no longer a grid, e.g. after token merging). The processor's token
counts, and so the prompt layout, the fused sequence and every cost figure, come from it
(ARCHITECTURE.md, contract 2); ``MultimodalModel.encode_media`` checks each item against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Connector(nn.Module):
    """Base class: ``forward(x (N, S, D_in), grid) -> (N, S', D_out)`` for N crops of S features,
    and optional learned output positions (one vector per output token of a crop, zero at init)."""

    # One output token per input feature (linear, MLP): any encoder, any feature layout.
    preserves_tokens = False

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        raise NotImplementedError

    @classmethod
    def build(cls, config, in_dim: int, out_dim: int, positions: int = 0) -> Connector:
        """The connector a ``ConnectorConfig`` describes, from ``in_dim`` features to ``out_dim``."""
        return cls(in_dim, out_dim, bias=config.bias, positions=positions)

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


def stack_settings(config, in_dim: int) -> dict:
    """The layer-stack settings a Q-Former or perceiver takes from its ``ConnectorConfig``: width
    (0: the features'), layers, heads, feed-forward width (0: 4 x width)."""
    hidden = config.hidden_size or in_dim
    return dict(hidden=hidden, num_layers=config.num_layers, num_heads=config.num_heads,
                intermediate=config.intermediate_size or 4 * hidden)


def patch_grid(x: torch.Tensor, grid: tuple[int, int] | None, name: str) -> tuple[int, int]:
    """The (rows, cols) of ``x``'s (N, S, D) patch features, checked against S."""
    if grid is None or grid[0] * grid[1] != x.shape[1]:
        raise ValueError(f"the {name} connector needs a patch grid matching its {x.shape[1]} features, got {grid}")
    return grid
