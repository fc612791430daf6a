"""Attention: one module for decoder self-attention (GQA, RoPE, KV cache), cross-attention and
vision encoders, on ``torch.nn.functional.scaled_dot_product_attention``. Boolean masks mean "may
attend"; every mask is built in ``omnifuse.nn.masks``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.nn.masks import SelfAttentionMask, query_rows_mask, select_rows
from omnifuse.nn.norm import RMSNorm
from omnifuse.nn.rope import apply_rope


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          is_causal: bool = False) -> torch.Tensor:
    # q: (B, Hq, T, Dh); k, v: (B, Hkv, S, Dh). Grouped-query attention shares each K/V head
    # across Hq / Hkv query heads (Ainslie et al. 2023).
    b, hq, t, dh = q.shape
    hkv = k.shape[1]
    if t == 1 and hq != hkv and (mask is None or mask.shape[1] == 1):
        # One decode query per head: fold each group's query heads into the query axis, so every
        # K/V head is read once per step instead of once per query head.
        out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, dh), k, v, attn_mask=mask)
        return out.view(b, hq, 1, dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=hq != hkv)


class Attention(nn.Module):
    """Multi-head attention: q/k/v/o projections, grouped K/V heads, optional per-head q/k RMSNorm,
    optional rotary positions. One module serves every use:

    - decoder self-attention: ``forward(x, rope=(cos, sin), mask=..., cache=..., slots=...)``,
      causal, keys and values written into a preallocated cache;
    - cross-attention (Flamingo, Llama 3.2 Vision): ``memory_kv(memory)`` projects the media once
      (the caller caches it), ``forward(x, kv=..., mask=...)`` projects only the text queries;
    - vision encoders: ``forward(x, mask=...)``, bidirectional.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-5, key_bias: bool | None = None,
                 out_bias: bool | None = None, kv_dim: int | None = None) -> None:
        """``bias`` on every projection, unless ``key_bias`` (Whisper: none on k) or ``out_bias``
        (Qwen2: none on o) says otherwise for that one. ``kv_dim``: the width of the memory keys and
        values are projected from, when it differs from ``dim`` (a Q-Former reading image features)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        kv_dim = kv_dim or dim
        self.k_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias if key_bias is None else key_bias)
        self.v_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias if out_bias is None else out_bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def _queries(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, Hq, T, Dh)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        return q if self.q_norm is None else self.q_norm(q)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, M, D) -> k, v: (B, Hkv, M, Dh) (k normalised when ``qk_norm``)."""
        b, m, _ = memory.shape
        k = self.k_proj(memory).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return (k if self.k_norm is None else self.k_norm(k)), v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # cross-attention: (B, Hkv, M, Dh) each
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: (B, 1, T, Dh)
        mask: torch.Tensor | None = None,  # (B, 1, T, S) bool (or additive); None: causal / full
        causal: bool = False,
        cache=None,  # a LayerKVCache, written in place at ``slots``
        slots: SelfAttentionMask | None = None,  # where the chunk goes in the cache
        queries: torch.Tensor | None = None,  # (B, K) long: answer only these positions (no cache)
    ) -> torch.Tensor:  # (B, T, D), or (B, K, D) with queries
        b, t, _ = x.shape
        if kv is not None:  # cross-attention: keys and values come from the media
            out = _sdpa(self._queries(x), kv[0], kv[1], mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        k, v = self.memory_kv(x)  # (B, Hkv, T, Dh)
        if rope is not None:
            k = apply_rope(k, *rope)
        if queries is not None:
            # Every position is a key, only the asked ones are queries: (B, K) rows of q, rope and mask.
            if cache is not None:
                raise ValueError("queries select positions of a full forward pass; not with a cache")
            q = self._queries(select_rows(x, queries))  # (B, Hq, K, Dh)
            if rope is not None:
                q = apply_rope(q, *(select_rows(c.squeeze(1), queries).unsqueeze(1) for c in rope))
            mask = query_rows_mask(mask, queries, t)
            out = _sdpa(q, k, v, mask)  # (B, Hq, K, Dh)
            return self.o_proj(out.transpose(1, 2).reshape(b, queries.shape[1], -1))
        q = self._queries(x)  # (B, Hq, T, Dh)
        if rope is not None:
            q = apply_rope(q, *rope)
        start = slots.start if slots is not None else 0
        is_causal = causal and mask is None and start == 0 and t > 1
        if cache is not None:
            k, v = cache.update(k, v, slots.start, slots.index, slots.end)  # (B, Hkv, S, Dh)
        if causal and mask is None and start != 0 and t > 1:
            raise ValueError("a multi-token chunk after the cache start needs an explicit mask")
        out = _sdpa(q, k, v, mask, is_causal=is_causal)  # (B, Hq, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
