"""Flamingo's perceiver resampler (Alayrac et al. 2022): learned latents attend to the image
features and themselves, and become a fixed number of tokens per image."""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.connectors.base import Connector, stack_settings
from omnifuse.nn.attention import Attention
from omnifuse.nn.mlp import ViTMLP


class PerceiverLayer(nn.Module):
    """Latents attend to [features; latents] (keys and values from both, queries from the latents),
    then a feed-forward block; pre-norm residuals."""

    def __init__(self, dim: int, num_heads: int, hidden: int, head_dim: int | None = None, activation: str = "gelu",
                 bias: bool = True) -> None:
        super().__init__()
        self.media_norm = nn.LayerNorm(dim)
        self.latent_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, head_dim=head_dim)  # no biases (Flamingo)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = ViTMLP(dim, hidden, activation, bias=bias)

    def forward(self, latents: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        # latents: (N, L, dim); media: (N, S, dim)
        q = self.latent_norm(latents)
        kv = self.attn.memory_kv(torch.cat([self.media_norm(media), q], dim=1))
        latents = latents + self.attn(q, kv=kv)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverConnector(Connector):
    """``tokens`` latents (default 64) of width ``hidden_size`` (default: the feature width),
    ``num_layers`` perceiver layers, a final norm, then a linear projection to the decoder width
    (none with ``project=False``: the latents at their own width, which IDEFICS's cross-attention
    layers project). Pairs with early fusion (its tokens spliced into the sequence) or
    cross-attention fusion (Flamingo: its tokens are the media memory)."""

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        return config.output_tokens

    @classmethod
    def build(cls, config, in_dim: int, out_dim: int, positions: int = 0) -> PerceiverConnector:
        return cls(in_dim, out_dim, num_latents=config.output_tokens, **stack_settings(config, in_dim),
                   positions=positions, head_dim=config.head_dim or None, activation=config.activation,
                   bias=config.bias, project=config.projection != "none")

    def __init__(self, in_dim: int, out_dim: int, *, num_latents: int = 64, hidden: int = 768, num_layers: int = 2,
                 num_heads: int = 12, intermediate: int = 3072, positions: int = 0, head_dim: int | None = None,
                 activation: str = "gelu", bias: bool = True, project: bool = True) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(num_latents, hidden))
        self.in_proj = nn.Linear(in_dim, hidden) if in_dim != hidden else None
        self.layers = nn.ModuleList(PerceiverLayer(hidden, num_heads, intermediate, head_dim, activation, bias)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, out_dim) if project else None
        self._init_positions(positions, out_dim if project else hidden)

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.latents, std=1.0)  # latents are inputs, like token embeddings at unit scale

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        # x: (N, S, in_dim) features of N crops -> (N, num_latents, out_dim)
        media = x if self.in_proj is None else self.in_proj(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, media)
        out = self.norm(latents)
        return self._add_positions(out if self.proj is None else self.proj(out))
