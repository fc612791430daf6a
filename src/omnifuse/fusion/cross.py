"""Cross-attention fusion (Flamingo, Llama 3.2 Vision).

Media features stay out of the token sequence. They form a per-row *memory*; gated
cross-attention layers placed before chosen decoder layers read it. Each memory position belongs
to one image; a text token sees the images whose placeholder token is at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omnifuse.nn.attention import Attention
from omnifuse.nn.masks import select_rows
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


@dataclass
class CrossAttentionInputs:
    """What the cross-attention blocks of one forward pass read.

    ``kv`` holds each block's media keys/values when they were computed once (prefill with a
    cache, and every decode step, from ``CrossAttentionCache``); without it (training) each block
    projects ``memory`` itself.
    """

    mask: torch.Tensor  # (B, 1, T, M) bool
    row_visible: torch.Tensor  # (B, T, 1), 0 where a token sees no media
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer index -> (B, Hkv, M, Dh) each
    memory: torch.Tensor | None = None  # (B, M, D)

    def for_layer(self, index: int, layer: CrossAttentionLayer, rows: torch.Tensor | None = None):
        """(kv, mask, row_visible) for the block before layer ``index``; ``rows`` (B, K) keeps
        only those query positions (the block after the last layer, when only some logits are wanted)."""
        kv = self.kv[index] if self.kv is not None else layer.cross_attn.memory_kv(self.memory)
        mask, row_visible = self.mask, self.row_visible
        if rows is not None:
            mask = select_rows(mask.squeeze(1), rows).unsqueeze(1)
            row_visible = select_rows(row_visible, rows)
        return kv, mask, row_visible


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


class CrossAttentionLayer(nn.Module):
    """Gated cross-attention block with its own gated SwiGLU (Llama 3.2 Vision layout).

    x + gate_attn(xattn(norm(x), memory)); then x + gate_mlp(mlp(norm(x))). Both gates start at
    zero, so a fresh layer leaves the hidden state unchanged (ARCHITECTURE.md, contract 4).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 eps: float = 1e-5, qk_norm: bool = True, zero_blind_attention: bool = True,
                 zero_blind_mlp: bool = True, kv_dim: int | None = None) -> None:
        """``kv_dim``: the media tokens' width when it is not ``dim`` (IDEFICS's perceiver output)."""
        super().__init__()
        # Tokens that see no image: zero_blind_attention False reproduces Llama 3.2 Vision (they still
        # add their attention output), zero_blind_mlp False IDEFICS (they still add the gated MLP's).
        self.zero_blind_attention = zero_blind_attention
        self.zero_blind_mlp = zero_blind_mlp
        self.input_layernorm = RMSNorm(dim, eps)
        self.cross_attn = Attention(dim, num_heads, num_kv_heads, head_dim, qk_norm=qk_norm, norm_eps=eps,
                                    kv_dim=kv_dim)
        self.attn_gate = TanhGate()
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.mlp_gate = TanhGate()

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                row_visible: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D); kv: (B, Hkv, M, Dh); mask: (B, 1, T, M); row_visible: (B, T, 1)
        attn = self.cross_attn(self.input_layernorm(x), kv=kv, mask=mask)
        x = x + self.attn_gate(attn * row_visible if self.zero_blind_attention else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + self.mlp_gate(mlp * row_visible if self.zero_blind_mlp else mlp)
