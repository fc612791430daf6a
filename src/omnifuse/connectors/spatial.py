"""Connectors that compress the patch grid spatially: pixel shuffle (Idefics3, SmolVLM) and
average pooling to a fixed token count (Gemma 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.connectors.base import Connector, patch_grid
from omnifuse.errors import ConfigError
from omnifuse.nn.norm import RMSNorm


def _projection(kind: str, in_dim: int, out_dim: int, bias: bool, hidden: int = 0) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias), nn.GELU(), nn.Linear(out_dim, out_dim, bias=bias))
    if kind == "llama4":  # Llama 4's vision adapter (two layers, GELU after each) and projector
        hidden = hidden or out_dim
        return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, hidden, bias=bias),
                             nn.GELU(), nn.Linear(hidden, out_dim, bias=bias))
    return nn.Linear(in_dim, out_dim, bias=bias)


def _require_grid(name: str, tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None or grid[0] * grid[1] != tokens:
        raise ConfigError(f"connector {name} needs patch features on a grid (no class token, no token merging); "
                          f"got {tokens} features on grid {grid}")
    return grid


def pixel_shuffle(x: torch.Tensor, rows: int, cols: int, s: int) -> torch.Tensor:
    """Space-to-depth: (N, rows*cols, D) -> (N, rows*cols / s^2, D * s^2), each s x s block of
    patches one token. The channel order is Idefics3's: the columns of a block are folded first,
    then its rows (so a token's channels are [row 0: col 0..s-1, row 1: ...] of D each)."""
    n, _, d = x.shape
    x = x.reshape(n, rows, cols // s, d * s)  # fold s neighbouring columns into channels
    x = x.transpose(1, 2).reshape(n, cols // s, rows // s, d * s * s)  # then s neighbouring rows
    return x.transpose(1, 2).reshape(n, rows * cols // (s * s), d * s * s)


class PixelShuffleConnector(Connector):
    """Pixel shuffle by ``scale_factor`` s (s^2 fewer tokens, s^2 times the channels), then a
    linear (Idefics3's ``modality_projection``, no bias), MLP or ``llama4`` projection (Llama 4:
    two ``hidden_size`` layers with GELU after each, then a linear to the decoder)."""

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        s = config.scale_factor
        grid = _require_grid("pixel_shuffle", tokens, grid)
        if grid[0] % s or grid[1] % s:
            raise ConfigError(f"connector pixel_shuffle scale_factor {s} does not divide the patch grid "
                              f"{grid[0]} x {grid[1]}")
        return tokens // (s * s)

    @classmethod
    def build(cls, config, in_dim: int, out_dim: int, positions: int = 0) -> PixelShuffleConnector:
        return cls(in_dim, out_dim, config.scale_factor, config.projection, config.bias, positions, config.hidden_size)

    def __init__(self, in_dim: int, out_dim: int, scale_factor: int = 2, projection: str = "linear",
                 bias: bool = False, positions: int = 0, hidden: int = 0) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.proj = _projection(projection, in_dim * scale_factor**2, out_dim, bias, hidden)
        self._init_positions(positions, out_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        rows, cols = patch_grid(x, grid, "pixel_shuffle")
        return self._add_positions(self.proj(pixel_shuffle(x, rows, cols, self.scale_factor)))


class PoolConnector(Connector):
    """Average-pool each crop's patch grid to ``num_tokens`` (a square, t x t) tokens, RMS-normalise
    and project (Gemma 3's multimodal projector). A grid that t does not divide is pooled
    adaptively (each output averages its share of the rows and columns)."""

    @staticmethod
    def side(config) -> int:
        t = config.output_tokens
        side = math.isqrt(t)
        if side * side != t:
            raise ConfigError(f"connector pool needs a square num_tokens, got {t}")
        return side

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        side = PoolConnector.side(config)
        grid = _require_grid("pool", tokens, grid)
        if grid[0] < side or grid[1] < side:
            raise ConfigError(f"connector pool to {side} x {side} tokens needs a patch grid at least that large, "
                              f"got {grid[0]} x {grid[1]}")
        return side * side

    @classmethod
    def build(cls, config, in_dim: int, out_dim: int, positions: int = 0) -> PoolConnector:
        return cls(in_dim, out_dim, cls.side(config), config.projection, config.bias, positions)

    def __init__(self, in_dim: int, out_dim: int, side: int, projection: str = "linear", bias: bool = False,
                 positions: int = 0) -> None:
        super().__init__()
        self.out_side = side
        self.norm = RMSNorm(in_dim)
        self.proj = _projection(projection, in_dim, out_dim, bias)
        self._init_positions(positions, out_dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        rows, cols = patch_grid(x, grid, "pool")
        n, _, d = x.shape
        g = x.transpose(1, 2).reshape(n, d, rows, cols)
        pooled = F.adaptive_avg_pool2d(g, self.out_side).flatten(2).transpose(1, 2)  # (N, t, D)
        return self._add_positions(self.proj(self.norm(pooled)))
