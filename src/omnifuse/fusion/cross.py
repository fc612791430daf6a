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
    real: torch.Tensor  # (B, M) bool: positions text may attend to (False for padded tiles and padding)


def build_memory(features: list[list[torch.Tensor]], dim: int, dtype: torch.dtype, device: torch.device,
                 real: list[list[torch.Tensor | None]] | None = None) -> MediaMemory:
    """Concatenate each row's image features and pad rows to the longest (rows may have none).
    ``real[b][i]`` (n_i,) bool marks image i's attendable positions (None = all)."""
    lengths = [sum(int(f.shape[0]) for f in row) for row in features]
    m = max(max(lengths, default=0), 1)
    mem = torch.zeros(len(features), m, dim, dtype=dtype, device=device)
    index = torch.full((len(features), m), -1, dtype=torch.long, device=device)
    attendable = torch.zeros(len(features), m, dtype=torch.bool, device=device)
    for b, row in enumerate(features):
        pos = 0
        for i, f in enumerate(row):
            n = int(f.shape[0])
            mem[b, pos:pos + n] = f.to(dtype)
            index[b, pos:pos + n] = i
            r = real[b][i] if real is not None else None
            attendable[b, pos:pos + n] = True if r is None else r.to(device)
            pos += n
    return MediaMemory(mem, index, attendable)


def visible_images(placeholders: torch.Tensor, num_images: int, span: str = "preceding") -> torch.Tensor:
    """Which images each token may read, from placeholder positions: (B, T) bool -> (B, T, N) bool.

    ``preceding``: image i is visible from its placeholder on. ``latest``: only the most recent
    placeholder group (consecutive placeholders form one group), as Llama 3.2 Vision's processor
    builds its cross-attention mask.
    """
    b, t = placeholders.shape
    seen = placeholders.long().cumsum(1)  # (B, T) images whose placeholder is at or before each token
    image = torch.arange(num_images, device=placeholders.device)
    visible = image[None, None, :] < seen[:, :, None]  # (B, T, N)
    if span == "latest" and num_images:
        # A group starts at a placeholder not preceded by one; tokens see images of their latest group.
        starts = placeholders & ~torch.nn.functional.pad(placeholders, (1, 0))[:, :-1]
        first_of_group = torch.zeros(b, t, dtype=torch.long, device=placeholders.device)
        for row in range(b):
            group_first = 0
            for pos in range(t):
                if bool(starts[row, pos]):
                    group_first = int(seen[row, pos]) - 1
                first_of_group[row, pos] = group_first
        visible &= image[None, None, :] >= first_of_group[:, :, None]
    return visible


def cross_attention_mask(visible: torch.Tensor, memory_index: torch.Tensor, real: torch.Tensor,
                         attend_all_when_blind: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """visible: (B, T, N) images each token may read; memory_index, real: (B, M).

    Returns ``mask`` (B, 1, T, M) bool (may attend) and ``row_visible`` (B, T, 1) float, 0 where a
    token sees no media at all. Such rows get a fallback mask so SDPA never sees an all-false row
    (it would return NaN): every real-image position when ``attend_all_when_blind`` (the Mllama
    reference attends to all of the row's media), otherwise everything (and the caller zeroes
    the output).
    """
    idx = memory_index.clamp(min=0)[:, None, :].expand(-1, visible.shape[1], -1)  # (B, T, M)
    if visible.shape[-1]:
        mask = torch.gather(visible, 2, idx) & (real & (memory_index >= 0))[:, None, :]
    else:
        mask = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    row_visible = mask.any(dim=-1, keepdim=True)  # (B, T, 1)
    fallback = (memory_index >= 0)[:, None, :] if attend_all_when_blind else torch.ones_like(mask[:, :1])
    fallback = fallback | ~fallback.any(dim=-1, keepdim=True)  # a row without any media at all
    mask = torch.where(row_visible, mask, fallback)
    return mask[:, None], row_visible.to(torch.get_default_dtype())


class CrossAttentionLayer(nn.Module):
    """Gated cross-attention block with its own gated SwiGLU (Llama 3.2 Vision layout).

    x + gate_attn(xattn(norm(x), memory)); then x + gate_mlp(mlp(norm(x))). Both gates start at
    zero, so a fresh layer leaves the hidden state unchanged (DESIGN contract 3).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 eps: float = 1e-5, qk_norm: bool = True, zero_blind_attention: bool = True) -> None:
        super().__init__()
        # False reproduces Llama 3.2 Vision: tokens that see no image still add their attention output.
        self.zero_blind_attention = zero_blind_attention
        self.input_layernorm = RMSNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, num_heads, num_kv_heads, head_dim, qk_norm=qk_norm, norm_eps=eps)
        self.attn_gate = TanhGate()
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.mlp_gate = TanhGate()

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                row_visible: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D); kv: (B, Hkv, M, Dh); mask: (B, 1, T, M); row_visible: (B, T, 1)
        attn = self.cross_attn(self.input_layernorm(x), kv, mask)
        x = x + self.attn_gate(attn * row_visible if self.zero_blind_attention else attn)
        return x + self.mlp_gate(self.mlp(self.post_attention_layernorm(x)) * row_visible)
