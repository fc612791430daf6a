"""Cross-attention fusion (Flamingo, Llama 3.2 Vision).

Media features stay out of the token sequence. They form a per-row *memory*; gated
cross-attention layers placed before chosen decoder layers read it. Each memory position belongs
to one image; a text token sees the images whose placeholder token is at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omnifuse.nn.attention import CrossAttention
from omnifuse.nn.mlp import SwiGLU
from omnifuse.nn.norm import RMSNorm


class TanhGate(nn.Module):
    """Flamingo: output scaled by tanh(alpha), alpha initialised at zero so a new layer is identity."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate.tanh()


@dataclass
class MediaMemory:
    """Padded media features of a batch for cross-attention."""

    features: torch.Tensor  # (B, M, D)
    image_index: torch.Tensor  # (B, M) long: which image of the row each position holds; -1 = padding


def build_memory(features: list[list[torch.Tensor]], dim: int, dtype: torch.dtype,
                 device: torch.device) -> MediaMemory:
    """Concatenate each row's image features and pad rows to the longest (rows may have none)."""
    lengths = [sum(int(f.shape[0]) for f in row) for row in features]
    m = max(max(lengths, default=0), 1)
    mem = torch.zeros(len(features), m, dim, dtype=dtype, device=device)
    index = torch.full((len(features), m), -1, dtype=torch.long, device=device)
    for b, row in enumerate(features):
        pos = 0
        for i, f in enumerate(row):
            n = int(f.shape[0])
            mem[b, pos:pos + n] = f.to(dtype)
            index[b, pos:pos + n] = i
            pos += n
    return MediaMemory(mem, index)


def cross_attention_mask(images_seen: torch.Tensor, image_index: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """images_seen: (B, T) images whose placeholder is at or before each token; image_index: (B, M).

    Returns ``mask`` (B, 1, T, M) bool (may attend) and ``row_visible`` (B, T, 1) float, 0 where a
    token sees no image at all. Such rows get a harmless all-true mask (SDPA would return NaN on an
    all-false row) and their cross-attention output is zeroed by ``row_visible``.
    """
    valid = image_index >= 0  # (B, M)
    mask = valid[:, None, :] & (image_index[:, None, :] < images_seen[:, :, None])  # (B, T, M)
    row_visible = mask.any(dim=-1, keepdim=True)  # (B, T, 1)
    mask = mask | ~row_visible
    return mask[:, None], row_visible.to(torch.get_default_dtype())


class CrossAttentionLayer(nn.Module):
    """Gated cross-attention block with its own gated SwiGLU (Llama 3.2 Vision layout).

    x + gate_attn(xattn(norm(x), memory)); then x + gate_mlp(mlp(norm(x))). Both gates start at
    zero, so a fresh layer leaves the hidden state unchanged (DESIGN contract 3).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 eps: float = 1e-5, qk_norm: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, num_heads, num_kv_heads, head_dim, qk_norm=qk_norm, norm_eps=eps)
        self.attn_gate = TanhGate()
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.mlp_gate = TanhGate()

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                row_visible: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D); kv: (B, Hkv, M, Dh); mask: (B, 1, T, M); row_visible: (B, T, 1)
        x = x + self.attn_gate(self.cross_attn(self.input_layernorm(x), kv, mask) * row_visible)
        return x + self.mlp_gate(self.mlp(self.post_attention_layernorm(x)) * row_visible)
