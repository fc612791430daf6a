"""Fusion strategies: how media features meet the text sequence."""

from omnifuse.fusion.cross import CrossAttentionLayer, MediaMemory, TanhGate, build_memory
from omnifuse.fusion.early import FeatureCountError, splice_features
from omnifuse.nn.masks import cross_attention_mask, visible_images

__all__ = [
    "CrossAttentionLayer",
    "FeatureCountError",
    "MediaMemory",
    "TanhGate",
    "build_memory",
    "cross_attention_mask",
    "splice_features",
    "visible_images",
]
