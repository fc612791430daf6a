"""Early fusion (LLaVA, GPT-4o, Llama 4): media tokens replace placeholder tokens in the sequence."""

from __future__ import annotations

import torch

from omnifuse.errors import FeatureCountError


def splice_features(
    embeds: torch.Tensor,  # (B, T, D) text embeddings
    is_slot: torch.Tensor,  # (B, T) bool: the placeholder positions of every modality
    features: list[list[torch.Tensor]],  # per row, per media item: (n_i, D), in prompt order
    what: str = "image",  # the modalities, as errors name them
) -> torch.Tensor:  # (B, T, D)
    """Write each row's media features, in order, over that row's placeholder positions."""
    if len(features) != embeds.shape[0]:
        raise FeatureCountError(f"got media for {len(features)} rows but the batch has {embeds.shape[0]}")
    out = embeds.clone()
    for row, feats in enumerate(features):
        n_slots = int(is_slot[row].sum())
        n_feats = sum(int(f.shape[0]) for f in feats)
        if n_slots != n_feats:
            raise FeatureCountError(
                f"row {row}: the prompt has {n_slots} {what} placeholder tokens but its {len(feats)} {what} "
                f"items give {n_feats} features; expand each placeholder to its item's token count"
            )
        if n_feats:
            out[row, is_slot[row]] = torch.cat(feats, dim=0).to(out.dtype)
    return out
