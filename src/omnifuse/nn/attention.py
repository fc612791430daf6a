"""Attention: one module for decoder self-attention (GQA, RoPE, KV cache), cross-attention and
vision encoders, on ``torch.nn.functional.scaled_dot_product_attention``. Boolean masks mean "may
attend"; every mask is built in ``omnifuse.nn.masks``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.nn.masks import LocalSpan, SelfAttentionMask, query_rows_mask, select_rows
from omnifuse.nn.norm import RMSNorm
from omnifuse.nn.rope import apply_rope

__all__ = ["Attention", "LocalAttention", "temperature_scale"]


def _weightless_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, in float32, without a learned scale (Llama 4's q/k norm)."""
    f = x.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scale(positions: torch.Tensor, floor: int, scale: float) -> torch.Tensor:
    """Llama 4's attention-temperature tuning of NoPE layers: queries at position p are scaled by
    ``1 + scale * log(1 + floor((p + 1) / floor))``, 1 below position ``floor - 1``, growing slowly
    after, so attention stays sharp over long contexts. positions (B, T) -> (B, 1, T, 1)."""
    steps = torch.div(positions + 1, floor, rounding_mode="floor").float()
    return (1 + scale * torch.log1p(steps))[:, None, :, None]


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
                 out_bias: bool | None = None, kv_dim: int | None = None, rope_qk_norm: bool = False,
                 temperature: tuple[int, float] | None = None) -> None:
        """``bias`` on every projection, unless ``key_bias`` (Whisper: none on k) or ``out_bias``
        (Qwen2: none on o) says otherwise for that one. ``kv_dim``: the width of the memory keys and
        values are projected from, when it differs from ``dim`` (a Q-Former reading image features).
        ``rope_qk_norm``: q and k RMS-normalised without a weight after RoPE (Llama 4); ``qk_norm``
        is the learned one before it. ``temperature``: (floor, scale) of ``temperature_scale`` on
        the queries (Llama 4's NoPE layers)."""
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
        self.rope_qk_norm, self.norm_eps, self.temperature = rope_qk_norm, norm_eps, temperature

    cache_span: LocalSpan | None = None  # what a cache row of this layer keeps: None, every slot
    keeps_unrotated = False

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

    def _self_qk(self, x: torch.Tensor, rope, positions: torch.Tensor | None, queries: torch.Tensor | None = None):
        """Self-attention q (B, Hq, T, Dh), k, v (B, Hkv, T, Dh) of ``x``: RoPE, the weightless norm
        and the temperature applied as configured. ``positions`` (B, T): the tokens' positions;
        ``queries`` (B, K): only these positions are queries (q is (B, Hq, K, Dh))."""
        k, v = self.memory_kv(x)
        unrotated = k
        if rope is not None:
            k = apply_rope(k, *rope)
        if queries is not None:
            x = select_rows(x, queries)
            if rope is not None:
                rope = tuple(select_rows(c.squeeze(1), queries).unsqueeze(1) for c in rope)
            positions = positions if positions is None else select_rows(positions, queries)
        q = self._queries(x)
        if self.keeps_unrotated:  # a layer that also reads q and k without positions (InfiniAttention)
            self._unrotated = (q, unrotated)
        if rope is not None:
            q = apply_rope(q, *rope)
        if self.rope_qk_norm:
            q, k = _weightless_rms(q, self.norm_eps), _weightless_rms(k, self.norm_eps)
        if self.temperature is not None and positions is not None:
            q = (q * temperature_scale(positions, *self.temperature)).to(q.dtype)
        return q, k, v

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
        positions = slots.position_ids if slots is not None else None
        if queries is not None:
            # Every position is a key, only the asked ones are queries: (B, K) rows of q and mask.
            if cache is not None:
                raise ValueError("queries select positions of a full forward pass; not with a cache")
            q, k, v = self._self_qk(x, rope, positions, queries)  # q: (B, Hq, K, Dh)
            mask = query_rows_mask(self._mask(slots, mask), queries, t)
            out = _sdpa(q, k, v, mask)  # (B, Hq, K, Dh)
            return self.o_proj(out.transpose(1, 2).reshape(b, queries.shape[1], -1))
        q, k, v = self._self_qk(x, rope, positions)
        out = self._attend(q, k, v, mask, causal, cache, slots)  # (B, Hq, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _mask(self, slots: SelfAttentionMask | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        return slots.mask if slots is not None and mask is None else mask

    def _attend(self, q, k, v, mask, causal, cache, slots) -> torch.Tensor:
        t = q.shape[2]
        mask = self._mask(slots, mask)
        start = slots.start if slots is not None else 0
        is_causal = causal and mask is None and start == 0 and t > 1
        if cache is not None:
            k, v = cache.update(k, v, slots.start, slots.index, slots.end)  # (B, Hkv, S, Dh)
        if causal and mask is None and start != 0 and t > 1:
            raise ValueError("a multi-token chunk after the cache start needs an explicit mask")
        return _sdpa(q, k, v, mask, is_causal=is_causal)


class LocalAttention(Attention):
    """Decoder self-attention bounded by a ``LocalSpan`` (sliding window or chunked), with a
    ``RingKVCache`` of ``span.capacity`` slots: memory and per-token work stay constant as the
    context grows.

    A single decode query writes its key first (replacing the oldest, which no query sees any
    more) and reads the ring alone. A chunk attends to the ring (earlier slots) and to its own
    keys, its queries in blocks of the ring's capacity R, block j reading the chunk's keys from
    block j - 1 on (and the ring, for block 0): nothing older is inside the span, so a long
    prompt costs T x 2R, not T x T. Then the chunk's last R keys go into the ring."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 span: LocalSpan, **kwargs) -> None:
        super().__init__(dim, num_heads, num_kv_heads, head_dim, **kwargs)
        self.cache_span = span

    def _mask(self, slots: SelfAttentionMask | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        if slots is None:
            raise ValueError("local attention needs the chunk's slots and positions")
        return slots.local(self.cache_span)

    def _attend(self, q, k, v, mask, causal, cache, slots) -> torch.Tensor:
        if slots is None:
            raise ValueError("local attention needs the chunk's slots and positions")
        span, pos, real = self.cache_span, slots.position_ids, slots.real
        t = q.shape[2]
        if cache is not None and t == 1:
            index = cache.write(k, v, slots.q_slot, pos, real)  # (B, 1)
            ring = torch.arange(cache.capacity, device=q.device)
            sees = (cache.valid & span.visible(pos, cache.pos)) | (ring[None, :] == index)  # itself, even if idle
            return _sdpa(q, cache.k, cache.v, sees[:, None, None, :])
        block = cache.capacity if cache is not None else span.capacity
        ring = cache is not None and slots.start != 0  # else every row starts here: the ring holds nothing yet
        outs = []
        for q0 in range(0, t, block):
            q1 = min(q0 + block, t)
            k0 = max(0, q0 - block)
            qs, ks = slice(q0, q1), slice(k0, q1)
            kb, vb, mb = k[:, :, ks], v[:, :, ks], slots.local(span, qs, ks) if t > block else slots.local(span)
            if ring and q0 == 0:
                earlier = cache.valid[:, None, :] & span.visible(pos[:, qs, None], cache.pos[:, None, :])  # (B, Tq, R)
                kb, vb = torch.cat((cache.k, kb), dim=2), torch.cat((cache.v, vb), dim=2)
                mb = torch.cat((earlier[:, None], mb), dim=-1)
            outs.append(_sdpa(q[:, :, qs], kb, vb, mb))
        if cache is not None:
            cache.write(k, v, slots.q_slot, pos, real)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
