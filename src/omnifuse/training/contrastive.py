"""The contrastive stage: image-text pre-training of the vision encoder (CLIP / SigLIP).

The image side is the vision encoder's mean-pooled features; the text side is the mean of the
decoder's (frozen) token embeddings of the caption, a bag of words. Each side gets a trainable
linear projection; the losses are in ``losses.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from omnifuse.training.losses import clip_loss, siglip_loss

__all__ = ["ContrastiveHead", "pooled_image_features"]


def pooled_image_features(encoder: nn.Module, pixel_batches: list[torch.Tensor]) -> torch.Tensor:
    """Each image's encoder features averaged over its crops and tokens: (N, Dv). Images whose
    crops have one shape go through the encoder as one batch (one pass per shape, not per image)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixel_batches):  # p: (crops, C, H, W)
        by_shape.setdefault(tuple(p.shape), []).append(i)
    pooled: list[torch.Tensor | None] = [None] * len(pixel_batches)
    for idx in by_shape.values():
        feats = encoder(torch.cat([pixel_batches[i] for i in idx]))  # (n * crops, tokens, Dv)
        means = feats.reshape(len(idx), -1, feats.shape[-1]).mean(dim=1)  # (n, Dv)
        for i, m in zip(idx, means):
            pooled[i] = m
    return torch.stack(pooled)  # type: ignore[arg-type]


class ContrastiveHead(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, dim: int = 128, loss: str = "clip") -> None:
        super().__init__()
        self.loss = loss
        self.image_proj = nn.Linear(vision_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        # CLIP starts at temperature 1/0.07; SigLIP at scale 10, bias -10 (their papers' inits).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07) if loss == "clip" else math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, model, pixel_batches: list[torch.Tensor], caption_ids: list[list[int]]) -> torch.Tensor:
        image = pooled_image_features(model.vision_encoder, pixel_batches)  # (N, Dv)
        with torch.no_grad():
            text = torch.stack([model.decoder.embed_tokens(torch.tensor(ids, device=model.device)).mean(dim=0) for ids in caption_ids])  # (N, Dt)
        img, txt = self.image_proj(image), self.text_proj(text)
        if self.loss == "clip":
            return clip_loss(img, txt, self.logit_scale)
        return siglip_loss(img, txt, self.logit_scale, self.logit_bias)
