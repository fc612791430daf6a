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

__all__ = ["ContrastiveHead"]


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
        image = torch.stack([model.vision_encoder(p).mean(dim=(0, 1)) for p in pixel_batches])  # (N, Dv)
        with torch.no_grad():
            text = torch.stack([model.embed_tokens(torch.tensor(ids)).mean(dim=0) for ids in caption_ids])  # (N, Dt)
        img, txt = self.image_proj(image), self.text_proj(text)
        if self.loss == "clip":
            return clip_loss(img, txt, self.logit_scale)
        return siglip_loss(img, txt, self.logit_scale, self.logit_bias)
