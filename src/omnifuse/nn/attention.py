"""Attention: decoder self-attention (GQA, RoPE, KV cache), gated-fusion cross-attention, ViT attention.

All use ``torch.nn.functional.scaled_dot_product_attention``. Boolean masks mean "may attend".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...), index: (B, K) long -> (B, K, ...): row b's positions index[b]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


class SelfAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,
        sin: torch.Tensor,  # (B, 1, T, Dh)
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, or None for plain causal / full cache
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, Hkv, L, Dh) each, written in place
        start: int = 0,  # where this chunk begins in the cache
        queries: torch.Tensor | None = None,  # (B, K) long: answer only these positions (no cache)
    ) -> torch.Tensor:  # (B, T, D), or (B, K, D) with queries
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if queries is not None:
            # Every position is a key, only the asked ones are queries: (B, K) rows of q, cos, sin, mask.
            if cache is not None:
                raise ValueError("queries select positions of a full forward pass; not with a cache")
            tq = queries.shape[1]
            q = self.q_proj(select_rows(x, queries)).view(b, tq, self.num_heads, self.head_dim).transpose(1, 2)
            q = apply_rope(q, *(select_rows(c.squeeze(1), queries).unsqueeze(1) for c in (cos, sin)))
            if mask is None:  # causal: a query sees the keys up to its own position
                keys = torch.arange(t, device=x.device)
                mask = (keys[None, None, :] <= queries[:, :, None])[:, None]  # (B, 1, K, T)
            else:
                mask = select_rows(mask.squeeze(1), queries).unsqueeze(1)  # (B, 1, K, S)
            out = _sdpa(q, k, v, mask)  # (B, Hq, K, Dh)
            return self.o_proj(out.transpose(1, 2).reshape(b, tq, -1))
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, Dh)
        q = apply_rope(q, cos, sin)
        causal = mask is None and start == 0 and t > 1
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + t] = k
            v_cache[:, :, start:start + t] = v
            k, v = k_cache[:, :, :start + t], v_cache[:, :, :start + t]  # (B, Hkv, S, Dh)
        if mask is None and start > 0 and t > 1:
            raise ValueError("a multi-token chunk after the cache start needs an explicit mask")
        out = _sdpa(q, k, v, mask, is_causal=causal)  # (B, Hq, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class CrossAttention(nn.Module):
    """Text queries attend to media memory (Flamingo / Llama 3.2 Vision cross-attention).

    K/V of the memory are computed once by ``memory_kv`` and cached by the caller; decode steps only
    project the new queries, so their cost does not grow with the number of media tokens beyond
    the attention itself. ``qk_norm`` adds per-head RMSNorm on queries and keys (Mllama).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qk_norm: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # memory: (B, M, D) -> k, v: (B, Hkv, M, Dh)
        b, m, _ = memory.shape
        k = self.k_proj(memory).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T, D); kv: (B, Hkv, M, Dh); mask: (B, 1, T, M) bool -> (B, T, D)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, Dh)
        if self.q_norm is not None:
            q = self.q_norm(q)
        out = _sdpa(q, kv[0], kv[1], mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class ViTAttention(nn.Module):
    """Bidirectional multi-head attention for the vision encoder (CLIP layout, with biases)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, D)
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))
