"""Media encoders: turn pixels (and later audio, video) into feature sequences."""

from omnifuse.encoders.vit import VisionTransformer

__all__ = ["VisionTransformer"]
