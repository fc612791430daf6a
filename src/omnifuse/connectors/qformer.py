"""BLIP-2's Querying Transformer (Li et al. 2023): a fixed set of learned queries reads the image
features through cross-attention and becomes the image's tokens, whatever the image's size."""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.connectors.base import Connector, stack_settings
from omnifuse.nn.attention import Attention
from omnifuse.nn.mlp import ViTMLP


class QFormerLayer(nn.Module):
    """A BERT layer (post-norm): self-attention over the queries, cross-attention from the queries
    to the image features (in every ``cross_attention_every``-th layer), feed-forward."""

    def __init__(self, dim: int, num_heads: int, hidden: int, kv_dim: int, cross: bool, eps: float = 1e-12) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, bias=True)
        self.self_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, bias=True, kv_dim=kv_dim) if cross else None
        self.cross_attn_norm = nn.LayerNorm(dim, eps=eps) if cross else None
        self.mlp = ViTMLP(dim, hidden, "gelu")
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # x: (N, Q, dim) queries; memory: (N, S, kv_dim) image features
        x = self.self_attn_norm(x + self.self_attn(x))
        if self.cross_attn is not None:
            x = self.cross_attn_norm(x + self.cross_attn(x, kv=self.cross_attn.memory_kv(memory)))
        return self.mlp_norm(x + self.mlp(x))


class QFormerConnector(Connector):
    """``tokens`` learned queries (default 32), ``num_layers`` BERT layers of width ``hidden_size``
    (default: the feature width) with cross-attention to the normalised image features every
    ``cross_attention_every``-th layer (from the first), then a linear projection to the decoder
    width (BLIP-2's ``language_projection``)."""

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        return config.output_tokens

    @classmethod
    def build(cls, config, in_dim: int, out_dim: int, positions: int = 0) -> QFormerConnector:
        return cls(in_dim, out_dim, num_queries=config.output_tokens, **stack_settings(config, in_dim),
                   cross_attention_every=config.cross_attention_every, positions=positions)

    def __init__(self, in_dim: int, out_dim: int, *, num_queries: int = 32, hidden: int = 768, num_layers: int = 2,
                 num_heads: int = 12, intermediate: int = 3072, cross_attention_every: int = 2,
                 positions: int = 0) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(num_queries, hidden))
        self.query_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.feature_norm = nn.LayerNorm(in_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, num_heads, intermediate, in_dim, cross=i % cross_attention_every == 0)
            for i in range(num_layers))
        self.proj = nn.Linear(hidden, out_dim)
        self._init_positions(positions, out_dim)

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.query_tokens, std=std)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        # x: (N, S, in_dim) features of N crops -> (N, num_queries, out_dim)
        memory = self.feature_norm(x)
        # expanded before the norm: a module is never handed a parameter itself (torch's module
        # tracker, which FlopCounterMode uses, fails on one under no_grad)
        q = self.query_norm(self.query_tokens.expand(x.shape[0], -1, -1))
        for layer in self.layers:
            q = layer(q, memory)
        return self._add_positions(self.proj(q))
