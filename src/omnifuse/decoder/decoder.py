"""The text decoder module (Llama family layout and parameter names)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from omnifuse.errors import ContextOverflowError
from omnifuse.inference.cache import KVCache
from omnifuse.nn.masks import self_attention_mask
from omnifuse.nn.norm import RMSNorm
from omnifuse.nn.rope import RotaryEmbedding

if TYPE_CHECKING:
    from omnifuse.config import DecoderConfig
    from omnifuse.decoder.layer import DecoderLayer
    from omnifuse.fusion.cross import CrossAttentionInputs

__all__ = ["TextDecoder"]


class TextDecoder(nn.Module):
    """Token embedding -> layers (each optionally preceded by a gated cross-attention block) ->
    RMSNorm -> output head.

    ``forward(input_ids, attention_mask, cache)`` returns logits (B, T, V). A multimodal model
    passes ``inputs_embeds`` instead of ids (early fusion: media spliced in) and ``cross`` (the
    media memory the cross-attention blocks read). ``cross_layers[str(i)]`` runs before layer i;
    index ``num_layers`` runs after the last layer.
    """

    def __init__(self, d: DecoderConfig, layers: list[DecoderLayer], cross_layers: dict[int, nn.Module]) -> None:
        super().__init__()
        self.max_position, self.num_kv_heads, self.head_dim = d.max_position, d.num_kv_heads, d.head_dim
        self.tie_embeddings = d.tie_embeddings
        self.embed_tokens = nn.Embedding(d.vocab_size + d.extra_embeddings, d.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.cross_layers = nn.ModuleDict({str(i): m for i, m in cross_layers.items()})
        self.norm = RMSNorm(d.hidden_size, d.norm_eps)
        self.lm_head = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        scaling = None
        if d.rope_type == "llama3":
            scaling = {"factor": d.rope_factor, "low_freq_factor": d.rope_low_freq_factor,
                       "high_freq_factor": d.rope_high_freq_factor, "original_max_position": d.rope_original_max_position}
        self.rope = RotaryEmbedding(d.head_dim, d.rope_theta, scaling)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with the output head when the config says so (again after
        ``to_empty``, which gives every parameter its own storage)."""
        if self.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.max_position:
            raise ContextOverflowError(f"cache length {max_len} exceeds the context length {self.max_position}")
        p = self.embed_tokens.weight
        rings = [min(span.capacity, max_len) if (span := layer.self_attn.cache_span) is not None else None
                 for layer in self.layers]
        cache = KVCache(len(self.layers), batch_size, self.num_kv_heads, max_len, self.head_dim,
                        dtype=p.dtype, device=p.device, rings=rings)
        for i, layer in enumerate(self.layers):  # a layer kind with a cache of its own (InfiniAttention)
            if hasattr(layer.self_attn, "new_cache"):
                cache.layers[i] = layer.self_attn.new_cache(batch_size, rings[i], p.dtype, p.device)
        return cache

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = left padding
        cache: KVCache | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D), in place of input_ids
        cross: CrossAttentionInputs | None = None,
        position_ids: torch.Tensor | None = None,  # (B, T); default: each row counts its real tokens on
        last_only: bool = False,
        outputs: torch.Tensor | None = None,  # (B, K) long: the positions whose logits are wanted
    ) -> torch.Tensor:  # (B, T, V), (B, 1, V) with last_only, (B, K, V) with outputs
        """``outputs`` (training): the last layer computes only the positions whose logits a loss
        reads, while every position stays a key; the result equals the full pass there. With a
        cache, every row continues from its own length (rows of a batch are independent)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        b, t = x.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=x.device)
        pos = self_attention_mask(attention_mask, cache, position_ids)
        rope = self.rope(pos.position_ids, x.dtype)
        last = len(self.layers) - 1
        for i in range(len(self.layers) + 1):
            key = str(i)
            if cross is not None and key in self.cross_layers:
                layer = self.cross_layers[key]
                x = layer(x, *cross.for_layer(i, layer, outputs if i > last else None))
            if i <= last:
                x = self.layers[i](x, rope, pos, cache.layer(i) if cache is not None else None,
                                   outputs if i == last else None)
        if cache is not None:
            cache.advance(attention_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))
