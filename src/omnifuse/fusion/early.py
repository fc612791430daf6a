"""Early fusion (LLaVA, GPT-4o, Llama 4): media tokens replace placeholder tokens in the sequence."""

from __future__ import annotations

import torch

from omnifuse.errors import FeatureCountError


def splice_features(
    embeds: torch.Tensor,  # (B, T, D) text embeddings
    input_ids: torch.Tensor,  # (B, T)
    features: list[list[torch.Tensor]],  # per row, per image: (n_i, D), in prompt order
    placeholder_id: int,
) -> torch.Tensor:  # (B, T, D)
    """Write each row's image features, in order, over that row's placeholder positions."""
    is_slot = input_ids == placeholder_id  # (B, T)
    if len(features) != embeds.shape[0]:
        raise FeatureCountError(f"got media for {len(features)} rows but the batch has {embeds.shape[0]}")
    out = embeds.clone()
    for row, feats in enumerate(features):
        n_slots = int(is_slot[row].sum())
        n_feats = sum(int(f.shape[0]) for f in feats)
        if n_slots != n_feats:
            raise FeatureCountError(
                f"row {row}: the prompt has {n_slots} image placeholder tokens but the images give "
                f"{n_feats} features ({len(feats)} images); expand each placeholder to its image's token count"
            )
        if n_feats:
            out[row, is_slot[row]] = torch.cat(feats, dim=0).to(out.dtype)
    return out
