"""Fusion strategies as objects: what a strategy means for the sequence, the caches and the cost
of a media item, and how its features enter the model. The model, prompt layout, cost figures and
planner ask the strategy instead of comparing its name.

Adding a strategy is a subclass here, an entry in ``FUSIONS`` and the modules it needs
(ARCHITECTURE.md, "Adding a fusion strategy").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from omnifuse.fusion.cross import CrossAttentionInputs, build_memory
from omnifuse.fusion.early import FeatureCountError, splice_features
from omnifuse.nn.masks import cross_attention_mask, visible_images

if TYPE_CHECKING:
    from omnifuse.config import FusionConfig

__all__ = ["FUSIONS", "CrossFusion", "EarlyFusion", "Fusion", "fusion_strategy"]


class Fusion:
    """A fusion strategy. ``in_sequence``: media tokens take context positions (and KV cache);
    otherwise they are kept beside the sequence as cross-attention states."""

    name: ClassVar[str]
    in_sequence: ClassVar[bool]

    def __init__(self, config: FusionConfig) -> None:
        self.config = config

    def placeholder_tokens(self, media_tokens: int) -> int:
        """Placeholder positions a media item of ``media_tokens`` tokens takes in the prompt."""
        raise NotImplementedError

    def context_tokens(self, media_tokens: int) -> int:
        """Context positions (self-attention KV) the item costs: its placeholders."""
        return self.placeholder_tokens(media_tokens)

    def cross_states(self, media_tokens: int) -> int:
        """States the item adds to the cross-attention memory (0 when it is in the sequence)."""
        return 0 if self.in_sequence else media_tokens

    def enter(self, model, x: torch.Tensor, input_ids: torch.Tensor, features, attendable, cache,
              decoding: bool) -> tuple[torch.Tensor, CrossAttentionInputs | None]:
        """Media features into the model: (embeddings for the decoder, inputs of its
        cross-attention blocks or None). ``features[b]``: row b's items, (n_i, D) each, in prompt
        order, or None when the batch has none; ``attendable[b][i]``: (n_i,) bool or None."""
        raise NotImplementedError


def _placeholder_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions holding the placeholder token of any modality the model takes."""
    ids = list(model.placeholder_ids.values())
    if not ids:  # a text-only model: no token is a placeholder
        return torch.zeros_like(input_ids, dtype=torch.bool)
    if len(ids) == 1:
        return input_ids == ids[0]
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


class EarlyFusion(Fusion):
    """LLaVA, GPT-4o, Llama 4: each media token replaces one placeholder in the sequence."""

    name = "early"
    in_sequence = True

    def placeholder_tokens(self, media_tokens: int) -> int:
        return media_tokens

    def enter(self, model, x, input_ids, features, attendable, cache, decoding):
        # Media enter at prefill. A placeholder id the model itself generates later is just a token.
        if decoding:
            return x, None
        has_media = features is not None and any(len(r) for r in features)
        slots = _placeholder_mask(model, input_ids)
        if has_media or bool(slots.any()):
            x = splice_features(x, slots, features or [[] for _ in range(x.shape[0])],
                                "/".join(model.placeholder_ids) or "media")
        return x, None


class CrossFusion(Fusion):
    """Flamingo, Llama 3.2 Vision: one placeholder per item marks where the text that may read it
    begins; gated cross-attention blocks read the items' features from their own cache."""

    name = "cross"
    in_sequence = False

    def placeholder_tokens(self, media_tokens: int) -> int:
        return 1

    def enter(self, model, x, input_ids, features, attendable, cache, decoding):
        """At decode every new token reads what the last prompt token read (Llama 3.2 Vision
        repeats the last row of its mask the same way), from the compacted cross-attention cache."""
        from omnifuse.inference.cache import CrossAttentionCache

        dtype = x.dtype
        if decoding:
            c = cache.cross
            return x, None if c is None else CrossAttentionInputs(c.last_mask, c.last_row_visible.to(dtype), kv=c.kv)
        placeholders = _placeholder_mask(model, input_ids)
        if features is None:
            if bool(placeholders.any()):
                raise FeatureCountError(f"the prompt has {int(placeholders.sum())} image placeholder tokens but "
                                        "no images were given")
            return x, None  # no media anywhere in the batch: every cross-attention block is identity
        for row, feats in enumerate(features):
            n = int(placeholders[row].sum())
            if n != len(feats):
                raise FeatureCountError(f"row {row}: the prompt has {n} image placeholder tokens but "
                                        f"{len(feats)} images were given")
        mem = build_memory(features, model.config.media_width, dtype, input_ids.device, attendable)
        visible = visible_images(placeholders, max(len(r) for r in features), self.config.cross_attention_span)
        mask, row_visible = cross_attention_mask(visible, mem.image_index, mem.real,
                                                 attend_all_when_blind=self.config.text_before_media == "attend_all")
        if cache is None:
            return x, CrossAttentionInputs(mask, row_visible.to(dtype), memory=mem.features)
        kv = {int(i): layer.cross_attn.memory_kv(mem.features) for i, layer in model.cross_layers.items()}
        cache.cross = CrossAttentionCache.from_prefill(kv, mask[:, 0, -1], row_visible[:, -1:])
        return x, CrossAttentionInputs(mask, row_visible.to(dtype), kv=kv)


FUSIONS: dict[str, type[Fusion]] = {"early": EarlyFusion, "cross": CrossFusion}


def fusion_strategy(config: FusionConfig) -> Fusion:
    return FUSIONS[config.type](config)
