"""Inference caches: per-layer self-attention KV caches with per-row lengths, and a separate
cross-attention cache computed once from the media at prefill.

Every row of a batch is its own request: it has its own length (slots used, left padding
included), its own next RoPE position and its own key mask, so a request prefilled alone can be
inserted into a free row of a running batch (``insert``) and decode on with the others.

A layer whose attention is bounded (sliding window, chunked) keeps a ``RingKVCache`` of the slots
it can still see instead of the whole sequence: its memory does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CrossAttentionCache", "InferenceCache", "KVCache", "LayerKVCache", "RingKVCache"]


class LayerKVCache:
    """One self-attention layer's keys and values, (B, Hkv, capacity, Dh) each, preallocated and
    written in place (torchtune / nanochat style). Layers own their caches so that a layer kind
    with a bounded window can hold fewer slots."""

    def __init__(self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> LayerKVCache:
        """A cache over existing tensors (a view of another cache's rows)."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int | None, index: torch.Tensor | None,
               end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk's k, v (B, Hkv, T, Dh) at slots ``start:start+T`` of every row, or at
        ``index`` (B, T) when rows are at different lengths; return slots ``:end`` of every row."""
        if start is not None:
            self.k[:, :, start:start + k.shape[2]] = k
            self.v[:, :, start:start + k.shape[2]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            self.k[rows, :, index] = k.transpose(1, 2)  # indexed view: (B, T, Hkv, Dh)
            self.v[rows, :, index] = v.transpose(1, 2)
        return self.k[:, :, :end], self.v[:, :, :end]

    def copy_row(self, row: int, other: LayerKVCache, other_row: int, n: int) -> None:
        """Row ``other_row``'s first ``n`` slots of ``other`` into ``row``."""
        self.k[row, :, :n] = other.k[other_row, :, :n]
        self.v[row, :, :n] = other.v[other_row, :, :n]

    def release_row(self, row: int) -> None:
        pass  # the key mask says which slots hold tokens

    def narrow(self, n: int) -> LayerKVCache:
        return LayerKVCache.of(self.k[:n], self.v[:n])

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class RingKVCache:
    """A bounded layer's keys and values: ``capacity`` slots per row, (B, Hkv, capacity, Dh), slot
    ``s`` of the sequence kept at ring index ``s % capacity``, with the position (``pos``) and
    realness (``valid``) of what each ring index holds. A chunk's attention reads the ring (what
    is earlier) and the chunk's own keys; then the chunk's last ``capacity`` slots replace the
    oldest entries. ``capacity`` is what the layer's span can still see (``LocalSpan.capacity``)."""

    def __init__(self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write(self, k: torch.Tensor, v: torch.Tensor, q_slot: torch.Tensor, pos: torch.Tensor,
              real: torch.Tensor) -> torch.Tensor:
        """Keep a chunk's k, v (B, Hkv, T, Dh) at slots ``q_slot`` (B, T), positions ``pos`` and
        realness ``real`` (B, T); of a chunk longer than the ring only its last ``capacity`` slots.
        Returns the ring indices written (B, T')."""
        r = self.capacity
        if q_slot.shape[1] > r:
            k, v, q_slot, pos, real = k[:, :, -r:], v[:, :, -r:], q_slot[:, -r:], pos[:, -r:], real[:, -r:]
        index = q_slot % r  # (B, T'): distinct per row, the slots being consecutive
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, index] = k.transpose(1, 2)
        self.v[rows, :, index] = v.transpose(1, 2)
        self.pos[rows, index] = pos
        self.valid[rows, index] = real
        return index

    def copy_row(self, row: int, other: RingKVCache, other_row: int, n: int) -> None:
        """Row ``other_row`` of ``other``, a row ``n`` slots long, into ``row`` (rings of another
        capacity included: each kept slot goes to its own ring index here)."""
        self.release_row(row)
        r, ro = self.capacity, other.capacity
        device = self.k.device
        j = torch.arange(ro, device=device)
        held = n - 1 - torch.remainder(n - 1 - j, ro)  # the slot each of other's ring indices holds
        keep = held >= max(0, n - r)
        src, dst = j[keep], held[keep] % r
        self.k[row, :, dst] = other.k[other_row, :, src]
        self.v[row, :, dst] = other.v[other_row, :, src]
        self.pos[row, dst] = other.pos[other_row, src]
        self.valid[row, dst] = other.valid[other_row, src]

    def release_row(self, row: int) -> None:
        self.valid[row] = False

    def narrow(self, n: int) -> RingKVCache:
        view = RingKVCache.__new__(RingKVCache)
        view.k, view.v, view.pos, view.valid = self.k[:n], self.v[:n], self.pos[:n], self.valid[:n]
        return view

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVCache:
    """The self-attention caches of every decoder layer plus each row's sequence state.

    ``lengths[b]``: slots row b has used (its left padding included); ``key_mask[b, s]``: slot s
    holds a real token; ``next_position[b]``: row b's next RoPE position.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 rings: list[int | None] | None = None) -> None:
        """``rings[i]``: the ring capacity of bounded layer i (``RingKVCache``), None for a layer
        that keeps every slot."""
        rings = rings or [None] * num_layers
        self.layers: list[LayerKVCache | RingKVCache] = [
            LayerKVCache(batch_size, num_kv_heads, max_len, head_dim, dtype, device) if r is None
            else RingKVCache(batch_size, num_kv_heads, r, head_dim, dtype, device) for r in rings]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lengths = [0] * batch_size  # on the host: slicing the cache needs no device sync
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def length(self) -> int:
        """The longest row's length (0 for an empty cache)."""
        return max(self.lengths, default=0)

    def layer(self, i: int) -> LayerKVCache | RingKVCache:
        return self.layers[i]

    @property
    def bounded(self) -> bool:
        """Some layer keeps only a ring of recent slots (a prefix cannot be cut out of it)."""
        return any(isinstance(layer, RingKVCache) for layer in self.layers)

    def advance(self, attention_mask: torch.Tensor) -> None:
        """Record a chunk (B, T) after its keys were written: a row with any real token in it
        moves on by T slots; a row without one (an idle row at decode) stays where it is."""
        t = attention_mask.shape[1]
        self.lengths = [n + t * r for n, r in zip(self.lengths, attention_mask.bool().any(dim=1).tolist())]

    def insert(self, row: int, other: KVCache, other_row: int = 0) -> None:
        """Copy request ``other_row`` of ``other`` (e.g. a prefill run alone) into ``row``."""
        n = other.lengths[other_row]
        if n > self.max_len:
            raise ValueError(f"a request of {n} cached tokens does not fit a cache of {self.max_len}")
        self.release(row)
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.copy_row(row, theirs, other_row, n)
        self.key_mask[row, :n] = other.key_mask[other_row, :n]
        self.next_position[row] = other.next_position[other_row]
        self.lengths[row] = n

    def release(self, row: int) -> None:
        """Free ``row`` for another request."""
        self.key_mask[row] = False
        self.next_position[row] = 0
        self.lengths[row] = 0
        for layer in self.layers:
            layer.release_row(row)

    def narrow(self, n: int) -> KVCache:
        """Rows ``0..n-1`` as a cache of their own over the same storage: a step run on it writes
        this cache's keys, values, key mask and positions; its ``lengths`` are a copy, which
        ``absorb`` takes back."""
        view = KVCache.__new__(KVCache)
        view.layers = [layer.narrow(n) for layer in self.layers]
        view.key_mask, view.next_position = self.key_mask[:n], self.next_position[:n]
        view.lengths, view.max_len = self.lengths[:n], self.max_len
        return view

    def absorb(self, view: KVCache) -> None:
        """Take back the lengths of a ``narrow`` view after a step ran on it."""
        self.lengths[:view.batch_size] = view.lengths

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class CrossAttentionCache:
    """Cross-attention K/V per fusion layer, computed once from the media at prefill.

    Decode tokens attend to what the last prompt token attended to, so ``kv`` keeps only those
    states (``from_prefill`` compacts them, real states first): padded tiles and images outside
    the last token's span cost nothing per step. ``valid`` marks the real kept states of each row;
    a row with none (no media) has zero K/V, so its attention output is exactly zero.
    """

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor,
                 last_row_visible: torch.Tensor) -> None:
        self.kv = kv  # decoder layer index -> (B, Hkv, M', Dh) each
        self.valid = valid  # (B, M') bool
        self.last_row_visible = last_row_visible  # (B, 1, 1): 0 where the row's last token sees no media
        self._update_mask()

    def _update_mask(self) -> None:
        v = self.valid
        # A row without any real state attends its zero K/V (SDPA would return NaN for a row that sees nothing).
        self.last_mask = None if bool(v.all()) else (v | ~v.any(dim=1, keepdim=True))[:, None, None, :]

    @classmethod
    def from_prefill(cls, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], last: torch.Tensor,
                     last_row_visible: torch.Tensor) -> CrossAttentionCache:
        """kv: (B, Hkv, M, Dh) per layer; last: (B, M) bool, the states the last prompt token reads;
        last_row_visible: (B, 1, 1)."""
        counts = last.sum(dim=1)  # (B,)
        keep = int(counts.max())
        order = torch.argsort((~last).to(torch.int8), dim=1, stable=True)[:, :keep]  # attended positions first
        compact = {}
        for i, (k, v) in kv.items():
            idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # (B, Hkv, keep, Dh)
            compact[i] = (k.gather(2, idx), v.gather(2, idx))
        valid = torch.arange(keep, device=last.device)[None, :] < counts[:, None]  # (B, keep)
        return cls(compact, valid, last_row_visible.clone())

    @classmethod
    def empty(cls, like: CrossAttentionCache, batch_size: int) -> CrossAttentionCache:
        """A cache of ``batch_size`` rows without media, shaped like ``like``'s layers."""
        kv = {i: (k.new_zeros(batch_size, *k.shape[1:]), v.new_zeros(batch_size, *v.shape[1:]))
              for i, (k, v) in like.kv.items()}
        valid = torch.zeros(batch_size, like.valid.shape[1], dtype=torch.bool, device=like.valid.device)
        return cls(kv, valid, like.last_row_visible.new_zeros(batch_size, 1, 1))

    def insert(self, row: int, other: CrossAttentionCache, other_row: int = 0) -> None:
        """Copy request ``other_row`` of ``other`` into ``row``, widening the kept states when it
        keeps more than this cache holds."""
        n = int(other.valid[other_row].sum())
        grow = n - self.valid.shape[1]
        if grow > 0:  # pad every layer's states (and ``valid``) on the right
            pad = torch.nn.functional.pad
            self.kv = {i: (pad(k, (0, 0, 0, grow)), pad(v, (0, 0, 0, grow))) for i, (k, v) in self.kv.items()}
            self.valid = pad(self.valid, (0, grow))
        for i, (k, v) in self.kv.items():
            ok, ov = other.kv[i]
            k[row], v[row] = 0, 0
            k[row, :, :n] = ok[other_row, :, :n]
            v[row, :, :n] = ov[other_row, :, :n]
        self.valid[row] = False
        self.valid[row, :n] = True
        self.last_row_visible[row] = other.last_row_visible[other_row]
        self._update_mask()

    def narrow(self, n: int) -> CrossAttentionCache:
        """Rows ``0..n-1`` over the same storage (decode only reads it)."""
        return CrossAttentionCache({i: (k[:n], v[:n]) for i, (k, v) in self.kv.items()}, self.valid[:n],
                                   self.last_row_visible[:n])

    def release(self, row: int) -> None:
        """Free ``row``: no media (zero K/V, nothing visible)."""
        for k, v in self.kv.values():
            k[row], v[row] = 0, 0
        self.valid[row] = False
        self.last_row_visible[row] = 0
        self._update_mask()

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


@dataclass
class InferenceCache:
    self_attn: KVCache
    cross: CrossAttentionCache | None = field(default=None)

    def insert(self, row: int, other: InferenceCache, other_row: int = 0) -> None:
        """Move a request prefilled in ``other`` into ``row`` of this (running) batch."""
        self.self_attn.insert(row, other.self_attn, other_row)
        if other.cross is not None:
            if self.cross is None:
                self.cross = CrossAttentionCache.empty(other.cross, self.self_attn.batch_size)
            self.cross.insert(row, other.cross, other_row)
        elif self.cross is not None:
            self.cross.release(row)

    def release(self, row: int) -> None:
        self.self_attn.release(row)
        if self.cross is not None:
            self.cross.release(row)

    def narrow(self, n: int) -> InferenceCache:
        """Rows ``0..n-1`` (a running batch fills its lowest rows first) over the same storage, so a
        decode step costs ``n`` rows, not the capacity; ``absorb`` it after the step."""
        return InferenceCache(self.self_attn.narrow(n), self.cross.narrow(n) if self.cross is not None else None)

    def absorb(self, view: InferenceCache) -> None:
        self.self_attn.absorb(view.self_attn)

    @property
    def nbytes(self) -> int:
        return self.self_attn.nbytes + (self.cross.nbytes if self.cross is not None else 0)
