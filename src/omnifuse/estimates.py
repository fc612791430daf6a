"""Cost estimators beside the model: parameters, visual tokens and cache bytes from a config alone.

``info`` builds the model on the meta device, so a 7B or 11B config costs no memory.
KV cache convention: keys and values for every self-attention layer, ``num_kv_heads * head_dim``
each, at the cache dtype; cross-attention caches hold the same per media state and cross layer.
"""

from __future__ import annotations

from typing import Any

import torch

from omnifuse.config import ModelConfig

__all__ = ["count_parameters", "kv_bytes_per_token", "cross_kv_bytes_per_state", "model_info", "request_cache_bytes"]


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters per component (tied weights counted once), without allocating them."""
    from omnifuse.model import build_model

    with torch.device("meta"):
        model = build_model(config)
    parts = {
        "vision_encoder": model.vision_encoder,
        "connector": model.connector,
        "cross_attention": model.cross_layers,
    }
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["decoder"] = counts["total"] - sum(counts[k] for k in parts)
    return counts


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = 4) -> int:
    d = config.decoder
    return 2 * d.num_layers * d.num_kv_heads * d.head_dim * dtype_bytes


def cross_kv_bytes_per_state(config: ModelConfig, dtype_bytes: int = 4) -> int:
    d = config.decoder
    return 2 * len(config.cross_layers) * d.num_kv_heads * d.head_dim * dtype_bytes


def request_cache_bytes(config: ModelConfig, sequence_tokens: int, visual_tokens: int, dtype_bytes: int = 4) -> int:
    """Cache one request holds: KV for every context position, plus the cross-attention K/V of every
    visual state in cross-attention models."""
    total = sequence_tokens * kv_bytes_per_token(config, dtype_bytes)
    if config.fusion.type == "cross":
        total += visual_tokens * cross_kv_bytes_per_state(config, dtype_bytes)
    return total


def model_info(config: ModelConfig, dtype_bytes: int = 4) -> dict[str, Any]:
    from omnifuse.model import build_image_processor

    size = config.image.image_size
    tokens = build_image_processor(config).num_tokens(size, size)
    cross = config.fusion.type == "cross"
    info: dict[str, Any] = {
        "name": config.name,
        "fusion": config.fusion.type,
        "parameters": count_parameters(config),
        "image_mode": config.image.mode,
        "default_image_size": [size, size],
        "visual_tokens_per_image": tokens,
        "context_tokens_per_image": 1 if cross else tokens,  # cross fusion keeps one placeholder
        "context_length": config.decoder.max_position,
        "cache_dtype_bytes": dtype_bytes,
        "kv_cache_bytes_per_token": kv_bytes_per_token(config, dtype_bytes),
    }
    if cross:
        info["cross_attention_layers"] = list(config.cross_layers)
        info["cross_attention_cache_bytes_per_image"] = tokens * cross_kv_bytes_per_state(config, dtype_bytes)
    else:
        info["kv_cache_bytes_per_image"] = tokens * kv_bytes_per_token(config, dtype_bytes)
    return info
