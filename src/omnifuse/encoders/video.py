"""Video encoder: the frames of a clip through the image encoder, with time.

Each frame group (``temporal_patch`` consecutive frames) gets a learned temporal embedding added to
its frames' features; with ``temporal_patch`` 2 the two frames' features are concatenated per token
and projected back (Qwen2.5-VL's temporal patches: half the tokens). The image encoder is the
model's own (``attach``), not a copy: a frame is seen exactly as an image is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VideoEncoder"]


class VideoEncoder(nn.Module):
    def __init__(self, *, feature_dim: int, max_groups: int, temporal_patch: int = 1, temporal_embedding: bool = True,
                 spatial_pool: int = 1, grid: int = 0) -> None:
        """``spatial_pool`` > 1: each frame's ``grid`` x ``grid`` patch features average-pooled by that
        stride (LLaVA-NeXT-Video's spatial pooling), before time is added."""
        super().__init__()
        self.temporal_patch, self.spatial_pool, self.grid = temporal_patch, spatial_pool, grid
        self.temporal_embedding = nn.Parameter(torch.zeros(max_groups, feature_dim)) if temporal_embedding else None
        self.merge = nn.Linear(temporal_patch * feature_dim, feature_dim) if temporal_patch > 1 else None
        self._image: tuple[nn.Module, ...] = ()  # the image encoder, held without registering it twice

    def attach(self, encoders: nn.ModuleDict) -> None:
        self._image = (encoders["image"],)

    def init_parameters(self, std: float) -> None:
        if self.temporal_embedding is not None:
            nn.init.normal_(self.temporal_embedding, std=std)

    def forward(self, pixel_values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        # (G, P, 3, H, W), (G,) group index within its clip -> (G, tokens per frame, D)
        if not self._image:
            raise RuntimeError("VideoEncoder.attach(model.encoders) was not called")
        g, p = pixel_values.shape[:2]
        feats = self._image[0](pixel_values.flatten(0, 1))  # (G * P, T, D)
        if self.spatial_pool > 1:
            n, _, d = feats.shape
            grid = feats.transpose(1, 2).reshape(n, d, self.grid, self.grid)
            feats = F.avg_pool2d(grid, self.spatial_pool).flatten(2).transpose(1, 2)
        feats = feats.view(g, p, *feats.shape[1:])
        if self.temporal_embedding is not None:
            feats = feats + self.temporal_embedding[group_ids.to(feats.device)][:, None, None, :]
        if self.merge is None:
            return feats[:, 0]
        return self.merge(feats.permute(0, 2, 1, 3).flatten(2))  # (G, T, P * D) -> (G, T, D)
