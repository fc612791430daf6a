"""One decoder layer: pre-norm residual blocks around an injected attention and feed-forward."""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.nn.masks import SelfAttentionMask, select_rows
from omnifuse.nn.norm import RMSNorm


class DecoderLayer(nn.Module):
    """x + attn(norm(x)); x + ffn(norm(x)) (Llama layout and parameter names).

    The builder chooses ``self_attn`` and ``mlp`` from the layer's spec; ``rope=False`` makes a
    NoPE layer (its attention sees no rotary positions).
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dim: int, eps: float, rope: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = mlp
        self.use_rope = rope

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (B, 1, T, Dh)
        slots: SelfAttentionMask,  # where the chunk goes in the cache, its positions and masks
        cache=None,  # this layer's LayerKVCache or RingKVCache
        queries: torch.Tensor | None = None,  # (B, K) long: compute only these positions
    ) -> torch.Tensor:  # (B, T, D), or (B, K, D) with queries
        h = self.input_layernorm(x)
        if queries is not None:
            x = select_rows(x, queries)
        x = x + self.self_attn(h, rope=rope if self.use_rope else None, causal=True, cache=cache,
                               slots=slots, queries=queries)
        return x + self.mlp(self.post_attention_layernorm(x))
