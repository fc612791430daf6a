"""Infini-attention (Munkhdalai et al. 2024): local attention within segments plus a compressive
memory of every earlier segment, mixed by a learned gate per head.

A layer splits the sequence into segments of S positions, aligned to position 0. It is
``chunked`` local attention of span S (``LocalAttention``, with its ring cache of the current
segment) plus, per head:

- retrieval: ``A_mem = s(q) M / (s(q) . z)``, with ``s = ELU + 1``, and M (Dk x Dv), z (Dk) the
  memory of the segments before the query's;
- update, as each segment completes: ``linear``, ``M += s(K)^T V``, ``z += sum s(K)``; or ``delta``,
  ``M += s(K)^T (V - s(K) M / (s(K) . z))``, which adds only what the memory does not already
  retrieve;
- output: ``sigmoid(b) * A_mem + (1 - sigmoid(b)) * A_local``, with b learned per head (0 at
  init, an even mix).

The memory reads q and k before RoPE: retrieval is by content, not position. A segment's update
is accumulated as its tokens arrive and added to M when it completes, so a cache holds M, z, the
pending update and the current segment's keys and values. That is constant in the context length.
The memory is computed in float32. Gradients flow through it across segments, so a long sequence
trains its memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnifuse.inference.cache import RingKVCache
from omnifuse.nn.attention import LocalAttention
from omnifuse.nn.masks import LocalSpan, SelfAttentionMask

__all__ = ["MEMORY_RULES", "InfiniAttention", "InfiniKVCache"]

MEMORY_RULES = ("linear", "delta")


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.float()) + 1


class InfiniKVCache(RingKVCache):
    """The current segment's keys and values (a ring of S slots), and per row and head the memory
    M (Dk x Dv), its normaliser z (Dk) and the current segment's pending update of both."""

    def __init__(self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, num_heads: int) -> None:
        super().__init__(batch_size, num_kv_heads, capacity, head_dim, dtype, device)
        shape = (batch_size, num_heads, head_dim)
        self.mem = torch.zeros(*shape, head_dim, dtype=torch.float32, device=device)
        self.norm = torch.zeros(shape, dtype=torch.float32, device=device)
        self.pending_mem, self.pending_norm = torch.zeros_like(self.mem), torch.zeros_like(self.norm)

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        return self.mem, self.norm, self.pending_mem, self.pending_norm

    def copy_row(self, row: int, other: InfiniKVCache, other_row: int, n: int) -> None:
        super().copy_row(row, other, other_row, n)
        for mine, theirs in zip(self.state, other.state, strict=True):
            mine[row] = theirs[other_row]

    def release_row(self, row: int) -> None:
        super().release_row(row)
        for t in self.state:
            t[row] = 0

    def narrow(self, n: int) -> InfiniKVCache:
        view = InfiniKVCache.__new__(InfiniKVCache)
        view.k, view.v, view.pos, view.valid = self.k[:n], self.v[:n], self.pos[:n], self.valid[:n]
        view.mem, view.norm, view.pending_mem, view.pending_norm = (t[:n] for t in self.state)
        return view

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.nbytes for t in self.state)


class InfiniAttention(LocalAttention):
    """``LocalAttention`` over segments of ``segment`` positions with a compressive memory of the
    earlier segments (module docstring). ``rule``: ``linear`` or ``delta``."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 segment: int, rule: str = "delta", **kwargs) -> None:
        if rule not in MEMORY_RULES:
            raise ValueError(f"memory rule {rule!r} unknown; known: {', '.join(MEMORY_RULES)}")
        super().__init__(dim, num_heads, num_kv_heads, head_dim, span=LocalSpan(chunk=segment), **kwargs)
        self.rule, self.keeps_unrotated = rule, True  # the memory reads q and k before RoPE
        self.memory_gate = torch.nn.Parameter(torch.zeros(num_heads))
        self._unrotated: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> InfiniKVCache:
        return InfiniKVCache(batch_size, self.num_kv_heads, capacity, self.head_dim, dtype, device, self.num_heads)

    def forward(self, x: torch.Tensor, *, queries: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if queries is not None:  # the memory needs every position in order: all of them, then the asked rows
            from omnifuse.nn.masks import select_rows

            return select_rows(self.forward(x, **kwargs), queries)
        return super().forward(x, **kwargs)

    def _attend(self, q, k, v, mask, causal, cache, slots: SelfAttentionMask) -> torch.Tensor:
        local = super()._attend(q, k, v, mask, causal, cache, slots)  # (B, Hq, T, Dh)
        q0, k0 = self._unrotated
        self._unrotated = None
        if cache is None:
            b = q.shape[0]
            state = [torch.zeros(b, self.num_heads, self.head_dim, *d, dtype=torch.float32, device=q.device)
                     for d in ((self.head_dim,), (), (self.head_dim,), ())]
        else:
            state = list(cache.state)
        memory = self._memory(q0, k0, v, slots, state)
        if cache is not None:
            for t, new in zip(cache.state, state, strict=True):
                t.copy_(new)
        gate = torch.sigmoid(self.memory_gate.float())[None, :, None, None]
        return (gate * memory + (1 - gate) * local.float()).to(local.dtype)

    def _memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: SelfAttentionMask,
                state: list[torch.Tensor]) -> torch.Tensor:
        """Retrieval for every query of the chunk, each from the memory of the segments before its
        own; ``state`` (M, z, pending M, pending z) is moved on past the chunk. q: (B, Hq, T, Dh);
        k, v: (B, Hkv, T, Dh), repeated over their query heads.

        The chunk's tokens are laid out as a grid of the segments it touches (R) by
        ``min(segment, T)`` cells, each token in the cell of its segment and its offset from that
        segment's first position in the chunk (rows start at different positions); empty cells hold
        zeros, which neither retrieve nor update. Each segment's retrieval and update then run over
        its own cells only: decoding a token is one cell, a prefill about T."""
        s = self.cache_span.chunk
        b, h, t, dh = q.shape
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1).float()
        pos, real = slots.position_ids, slots.real  # (B, T)
        if not bool(real.any()):
            return torch.zeros(b, h, t, dh, dtype=torch.float32, device=q.device)
        start = torch.where(real, pos, pos.new_full((), 1 << 62)).min(dim=1, keepdim=True).values  # (B, 1)
        segment = torch.div(pos, s, rounding_mode="floor")
        rel = segment - torch.div(start, s, rounding_mode="floor")  # each token's segment, from the row's first
        width = min(s, t)
        offset = pos - torch.maximum(segment * s, start)  # from the segment's first position in this chunk
        segments = int(torch.where(real, rel, -1).max()) + 1
        cells = segments * width
        index = torch.where(real, rel * width + offset, cells)  # padding goes to a spare cell, dropped
        index = index[:, None, :, None].expand(b, h, t, dh)

        def grid(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B, H, R, width, D)
            g = x.new_zeros(b, h, cells + 1, dh).scatter(2, index, x)
            return g[:, :, :cells].view(b, h, segments, width, dh)

        sq, sk, gv = grid(_phi(q)), grid(_phi(k)), grid(v)
        # (B, R): whether segment r completes in this chunk (its last position is here)
        completes = torch.where(real & (pos % s == s - 1), rel, segments)
        done_at = torch.zeros(b, segments + 1, dtype=torch.bool, device=q.device).scatter(1, completes, True)
        mem, norm, pending_mem, pending_norm = state
        out = []
        for r in range(segments):
            qr, kr, vr = sq[:, :, r], sk[:, :, r], gv[:, :, r]
            out.append((qr @ mem) / (qr * norm[:, :, None, :]).sum(-1, keepdim=True).clamp(min=1e-6))
            if self.rule == "delta":  # what the memory already retrieves for these keys is not added again
                vr = vr - (kr @ mem) / (kr * norm[:, :, None, :]).sum(-1, keepdim=True).clamp(min=1e-6)
            pending_mem = pending_mem + kr.transpose(-1, -2) @ vr
            pending_norm = pending_norm + kr.sum(dim=2)
            done = done_at[:, r, None, None]  # (B, 1, 1)
            mem = torch.where(done[..., None], mem + pending_mem, mem)
            norm = torch.where(done, norm + pending_norm, norm)
            pending_mem = torch.where(done[..., None], torch.zeros_like(pending_mem), pending_mem)
            pending_norm = torch.where(done, torch.zeros_like(pending_norm), pending_norm)
        state[:] = [mem, norm, pending_mem, pending_norm]
        retrieved = torch.cat([torch.stack(out, dim=2).view(b, h, cells, dh), sq.new_zeros(b, h, 1, dh)], dim=2)
        return retrieved.gather(2, index)
