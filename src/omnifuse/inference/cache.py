"""Inference caches: a preallocated self-attention KV cache and a separate cross-attention cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCache:
    """Preallocated keys/values for every self-attention layer (torchtune / nanochat style).

    ``key_mask`` marks real (non-padding) positions; rows of a batch share ``length`` because
    batches are left-padded. ``next_position`` is each row's next RoPE position.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]  # (B, Hkv, L, Dh) views, written in place

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class CrossAttentionCache:
    """Cross-attention K/V per fusion layer, computed once from the media at prefill."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # decoder layer index -> (B, Hkv, M, Dh) each
    # Decode tokens attend to what the last prompt token attended to; ``kv`` holds only those
    # states (compacted at prefill), ``last_mask`` marks padding when rows keep different counts.
    last_mask: torch.Tensor | None  # (B, 1, 1, M') bool, or None when every kept state is valid
    last_row_visible: torch.Tensor  # (B, 1, 1): 0 where that token sees no media

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


@dataclass
class InferenceCache:
    self_attn: KVCache
    cross: CrossAttentionCache | None = field(default=None)

    @property
    def nbytes(self) -> int:
        return self.self_attn.nbytes + (self.cross.nbytes if self.cross is not None else 0)
