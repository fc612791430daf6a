"""BLIP-2's Querying Transformer (Li et al. 2023): a fixed set of learned queries reads the image
features through cross-attention and becomes the image's tokens, whatever the image's size.

InstructBLIP (Dai et al. 2023) also feeds the instruction to it: the prompt's tokens in the
Q-Former's own vocabulary join the queries in self-attention (with their own feed-forward
blocks), so what the queries extract depends on the question. Only the queries are output.
"""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.connectors.base import Connector, stack_settings
from omnifuse.nn.attention import Attention
from omnifuse.nn.mlp import ViTMLP


class QFormerLayer(nn.Module):
    """A BERT layer (post-norm): self-attention over the queries (and instruction tokens),
    cross-attention from the queries to the image features (in every ``cross_attention_every``-th
    layer), feed-forward (the instruction tokens through their own, ``text_mlp``)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, kv_dim: int, cross: bool, text: bool = False,
                 eps: float = 1e-12) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, bias=True)
        self.self_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, bias=True, kv_dim=kv_dim) if cross else None
        self.cross_attn_norm = nn.LayerNorm(dim, eps=eps) if cross else None
        self.mlp = ViTMLP(dim, hidden, "gelu")
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.text_mlp = ViTMLP(dim, hidden, "gelu") if text else None
        self.text_mlp_norm = nn.LayerNorm(dim, eps=eps) if text else None

    def forward(self, x: torch.Tensor, memory: torch.Tensor, queries: int | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, Q [+ L], dim) queries [then instruction tokens]; memory: (N, S, kv_dim) image
        # features; mask: (N, 1, 1, Q + L) bool, the keys that are not padding
        x = self.self_attn_norm(x + self.self_attn(x, mask=mask))
        q, t = (x, None) if queries is None else (x[:, :queries], x[:, queries:])
        if self.cross_attn is not None:
            q = self.cross_attn_norm(q + self.cross_attn(q, kv=self.cross_attn.memory_kv(memory)))
        q = self.mlp_norm(q + self.mlp(q))
        if t is None:
            return q
        return torch.cat([q, self.text_mlp_norm(t + self.text_mlp(t))], dim=1)


class QFormerConnector(Connector):
    """``tokens`` learned queries (default 32), ``num_layers`` BERT layers of width ``hidden_size``
    (default: the feature width) with cross-attention to the image features every
    ``cross_attention_every``-th layer (from the first), then a linear projection to the decoder
    width (BLIP-2's ``language_projection``). The features are layer-normalised first unless
    ``feature_norm`` is off (BLIP-2's vision tower normalises its own output).

    ``instruction_vocab_size`` > 0 (InstructBLIP): ``forward`` also takes each crop's instruction
    ids and padding mask; they are embedded with learned absolute positions (at most
    ``instruction_positions``) and attend with the queries."""

    reads_instruction = False

    @staticmethod
    def num_output_tokens(config, tokens: int, grid: tuple[int, int] | None) -> int:
        return config.output_tokens

    @classmethod
    def build(cls, config, in_dim: int, out_dim: int, positions: int = 0) -> QFormerConnector:
        return cls(in_dim, out_dim, num_queries=config.output_tokens, **stack_settings(config, in_dim),
                   cross_attention_every=config.cross_attention_every, positions=positions,
                   feature_norm=config.feature_norm, instruction_vocab_size=config.instruction_vocab_size,
                   instruction_positions=config.instruction_positions)

    def __init__(self, in_dim: int, out_dim: int, *, num_queries: int = 32, hidden: int = 768, num_layers: int = 2,
                 num_heads: int = 12, intermediate: int = 3072, cross_attention_every: int = 2,
                 positions: int = 0, feature_norm: bool = True, instruction_vocab_size: int = 0,
                 instruction_positions: int = 512) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(num_queries, hidden))
        self.reads_instruction = instruction_vocab_size > 0
        if self.reads_instruction:
            self.word_embeddings = nn.Embedding(instruction_vocab_size, hidden)
            self.position_embeddings = nn.Embedding(instruction_positions, hidden)
        self.query_norm = nn.LayerNorm(hidden, eps=1e-12)  # over the queries and instruction tokens alike
        self.feature_norm = nn.LayerNorm(in_dim) if feature_norm else None
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, num_heads, intermediate, in_dim, cross=i % cross_attention_every == 0,
                         text=self.reads_instruction)
            for i in range(num_layers))
        self.proj = nn.Linear(hidden, out_dim)
        self._init_positions(positions, out_dim)

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.query_tokens, std=std)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                instruction: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x: (N, S, in_dim) features of N crops -> (N, num_queries, out_dim).
        # instruction: (ids (N, L) long, mask (N, L) bool: True where a token, False padding)
        memory = x if self.feature_norm is None else self.feature_norm(x)
        # expanded before the norm: a module is never handed a parameter itself (torch's module
        # tracker, which FlopCounterMode uses, fails on one under no_grad)
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        n_queries, mask = q.shape[1], None
        if self.reads_instruction:
            if instruction is None:
                raise ValueError("this Q-Former reads each image's instruction (InstructBLIP): no instruction ids "
                                 "were given with the image")
            ids, keep = instruction
            if ids.shape[1] > self.position_embeddings.num_embeddings:
                raise ValueError(f"the instruction has {ids.shape[1]} Q-Former tokens; the Q-Former takes at most "
                                 f"{self.position_embeddings.num_embeddings}")
            pos = torch.arange(ids.shape[1], device=ids.device)
            text = self.word_embeddings(ids) + self.position_embeddings(pos)
            q = torch.cat([q, text.to(q.dtype)], dim=1)
            keys = torch.cat([keep.new_ones(ids.shape[0], n_queries), keep], dim=1)  # (N, Q + L)
            mask = keys[:, None, None, :]
        h = self.query_norm(q)
        for layer in self.layers:
            h = layer(h, memory, n_queries if self.reads_instruction else None, mask)
        return self._add_positions(self.proj(h[:, :n_queries]))
