"""Builders wire the decoder from its config: each ``LayerSpec`` names an attention and a
feed-forward kind, looked up here. Adding a layer kind is one entry in a registry and its module
(see ARCHITECTURE.md, "Adding a layer kind")."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from omnifuse.nn.attention import Attention, LocalAttention
from omnifuse.nn.masks import LocalSpan
from omnifuse.nn.mlp import SwiGLU

if TYPE_CHECKING:
    from omnifuse.config import DecoderConfig, LayerSpec, ModelConfig
    from omnifuse.decoder.decoder import TextDecoder
    from omnifuse.decoder.layer import DecoderLayer

__all__ = ["ATTENTION", "FEED_FORWARD", "build_decoder", "build_layer"]


def _attention_kwargs(d: DecoderConfig, spec: LayerSpec) -> dict:
    temperature = (d.attn_temperature_floor, d.attn_temperature_scale) if d.attn_temperature_floor and not spec.rope else None
    return dict(bias=d.attention_bias or d.qkv_bias, out_bias=d.attention_bias, rope_qk_norm=spec.qk_norm,
                norm_eps=d.norm_eps, temperature=temperature)


def _full_attention(d: DecoderConfig, spec: LayerSpec) -> nn.Module:
    return Attention(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, **_attention_kwargs(d, spec))


def _sliding_attention(d: DecoderConfig, spec: LayerSpec) -> nn.Module:
    return LocalAttention(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim,
                          span=LocalSpan(window=d.sliding_window), **_attention_kwargs(d, spec))


def _chunked_attention(d: DecoderConfig, spec: LayerSpec) -> nn.Module:
    return LocalAttention(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim,
                          span=LocalSpan(chunk=d.attention_chunk_size), **_attention_kwargs(d, spec))


def _dense(d: DecoderConfig, spec: LayerSpec) -> nn.Module:
    return SwiGLU(d.hidden_size, d.intermediate_size)


def _moe(d: DecoderConfig, spec: LayerSpec) -> nn.Module:
    from omnifuse.nn.moe import MoE

    return MoE(d.hidden_size, d.expert_intermediate_size or d.intermediate_size, d.num_experts,
               d.experts_per_token, d.router, d.shared_expert_intermediate_size)


def _infini_attention(d: DecoderConfig, spec: LayerSpec) -> nn.Module:
    from omnifuse.nn.infini import InfiniAttention

    return InfiniAttention(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, segment=d.memory_segment,
                           rule=d.memory_rule, **_attention_kwargs(d, spec))


# kind -> builder(decoder config, layer spec) -> module
ATTENTION: dict[str, Callable[[DecoderConfig, LayerSpec], nn.Module]] = {
    "full": _full_attention, "sliding": _sliding_attention, "chunked": _chunked_attention,
    "infini": _infini_attention}
FEED_FORWARD: dict[str, Callable[[DecoderConfig, LayerSpec], nn.Module]] = {"dense": _dense, "moe": _moe}


def build_layer(d: DecoderConfig, spec: LayerSpec) -> DecoderLayer:
    from omnifuse.decoder.layer import DecoderLayer

    return DecoderLayer(ATTENTION[spec.attention](d, spec), FEED_FORWARD[spec.feed_forward](d, spec),
                        d.hidden_size, d.norm_eps, rope=spec.rope)


def build_decoder(config: ModelConfig) -> TextDecoder:
    """The decoder of ``config``: its layer specs, and a gated cross-attention block (from the
    fusion config) in front of every layer whose spec asks for one, and after the last when the
    fusion config says so."""
    from omnifuse.decoder.decoder import TextDecoder
    from omnifuse.fusion.cross import CrossAttentionLayer

    d = config.decoder
    specs = config.layer_specs
    cross_at = [i for i, s in enumerate(specs) if s.cross_attention]
    if config.final_cross_attention:
        cross_at.append(d.num_layers)
    blind = config.fusion.text_before_media
    cross = {i: CrossAttentionLayer(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size,
                                    d.norm_eps, qk_norm=config.fusion.cross_attention_qk_norm,
                                    zero_blind_attention=blind in ("skip", "skip_attention"),
                                    zero_blind_mlp=blind != "skip_attention", kv_dim=config.media_width)
             for i in cross_at}
    return TextDecoder(d, [build_layer(d, s) for s in specs], cross)
