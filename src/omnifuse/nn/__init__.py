"""Building blocks shared by encoders and decoders."""

from omnifuse.nn.attention import CrossAttention, SelfAttention, ViTAttention
from omnifuse.nn.mlp import SwiGLU, ViTMLP
from omnifuse.nn.norm import RMSNorm
from omnifuse.nn.rope import RotaryEmbedding, apply_rope

__all__ = [
    "CrossAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfAttention",
    "SwiGLU",
    "ViTAttention",
    "ViTMLP",
    "apply_rope",
]
