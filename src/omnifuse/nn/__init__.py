"""Building blocks shared by encoders and decoders."""

from omnifuse.nn.attention import Attention
from omnifuse.nn.mlp import SwiGLU, ViTMLP
from omnifuse.nn.norm import RMSNorm
from omnifuse.nn.rope import RotaryEmbedding, apply_rope

__all__ = [
    "Attention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "ViTMLP",
    "apply_rope",
]
