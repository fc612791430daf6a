"""Every attention mask in one place. Boolean masks mean "may attend".

Self-attention: causal over a left-padded batch whose cache may already hold earlier tokens; a
query at a padding position sees itself (SDPA returns NaN for a row that sees nothing).
Cross-attention: which media each text token may read, from the placeholder positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LocalSpan", "SelfAttentionMask", "chunk_positions", "cross_attention_mask", "query_rows_mask", "select_rows", "self_attention_mask",
           "visible_images"]


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...), index: (B, K) long -> (B, K, ...): row b's positions index[b]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


@dataclass(frozen=True)
class LocalSpan:
    """Which earlier positions a bounded self-attention layer sees (besides causality and padding):
    the last ``window`` positions, the query's own included (Mistral, Gemma 3 sliding window), or
    the positions of the query's ``chunk``-sized block aligned to position 0 (Llama 4 chunked
    attention: the token at position C sees only itself)."""

    window: int = 0
    chunk: int = 0

    @property
    def capacity(self) -> int:
        """Cache slots a layer of this span needs: every key a later query can still see."""
        return self.window or self.chunk

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Broadcast positions -> bool: key position ``k_pos`` is inside the span of ``q_pos``
        (``k_pos <= q_pos`` is the caller's to ensure)."""
        if self.window:
            return q_pos - k_pos < self.window
        return torch.div(q_pos, self.chunk, rounding_mode="floor") == torch.div(k_pos, self.chunk, rounding_mode="floor")


@dataclass(eq=False)
class SelfAttentionMask:
    """Where a chunk goes in the cache and what each of its queries may see.

    ``mask`` (full attention over slots ``:end``) is built on first use, so a model whose layers
    are all bounded never builds it; ``local(span)`` is the mask of a bounded layer over the
    chunk's own keys, built once per span and shared by the layers of that span."""

    position_ids: torch.Tensor  # (B, T) RoPE positions
    start: int | None  # the slot every row's chunk starts at, or None when rows differ ...
    index: torch.Tensor | None  # ... and then (B, T) each row's slots
    end: int  # keys are slots :end of every row
    real: torch.Tensor  # (B, T) bool: the chunk's real tokens (not padding, not an idle row)
    keys: torch.Tensor | None = None  # (B, end) bool: slots holding real tokens; None: all of them
    plain: bool = True  # plain causal attention (or a single query over a full cache) needs no mask
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def q_slot(self) -> torch.Tensor:  # (B, T): each query's slot
        if self.index is not None:
            return self.index
        b, t = self.real.shape
        return torch.arange(self.start, self.start + t, device=self.real.device).expand(b, t)

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, S) bool over slots ``:end``, or None when plain causal attention suffices."""
        if self.plain:
            return None
        if "full" not in self._masks:
            q_slot = self.q_slot
            k_slot = torch.arange(self.end, device=q_slot.device)  # (S,)
            keys = self.keys if self.keys is not None else torch.ones(q_slot.shape[0], self.end, dtype=torch.bool,
                                                                      device=q_slot.device)
            causal = k_slot[None, None, :] <= q_slot[:, :, None]  # (B, T, S)
            mask = (keys[:, None, :] & causal) | (k_slot[None, None, :] == q_slot[:, :, None])  # padding sees itself
            self._masks["full"] = mask[:, None]
        return self._masks["full"]

    def local(self, span: LocalSpan, queries: slice = slice(None), keys: slice = slice(None)) -> torch.Tensor:
        """(B, 1, Tq, Tk) bool: what the chunk's queries ``queries`` see among the chunk's own keys
        ``keys`` under ``span`` (causal, real keys, inside the span; a padding query sees itself).
        The whole chunk's mask is built once per span and shared by the layers of that span."""
        whole = queries == slice(None) and keys == slice(None)
        if whole and span in self._masks:
            return self._masks[span]
        t = self.real.shape[1]
        qi = torch.arange(t, device=self.real.device)[queries]
        ki = torch.arange(t, device=self.real.device)[keys]
        pos = self.position_ids
        inside = span.visible(pos[:, queries, None], pos[:, None, keys])  # (B, Tq, Tk)
        mask = ((ki[None, :] <= qi[:, None]) & inside & self.real[:, None, keys]) | (ki[None, :] == qi[:, None])
        mask = mask[:, None]
        if whole:
            self._masks[span] = mask
        return mask


def chunk_positions(attention_mask: torch.Tensor, cache=None) -> torch.Tensor:
    """RoPE positions (B, T) of a chunk: each row counts its real tokens on from where it stands."""
    offset = cache.next_position[:, None] if cache is not None else 0
    return (offset + attention_mask.long().cumsum(1) - 1).clamp(min=0)


def self_attention_mask(attention_mask: torch.Tensor, cache=None,
                        position_ids: torch.Tensor | None = None) -> SelfAttentionMask:
    """Slots, positions and mask for a chunk ``attention_mask`` (B, T) (1 = token, 0 = left padding
    or an idle row). ``position_ids`` default to ``chunk_positions``.

    With a ``KVCache`` each row's chunk follows what that row holds (rows may be at different
    lengths: a request joined a running batch); the chunk's padding is recorded in the key mask
    and each row's next RoPE position advances by its real tokens."""
    b, t = attention_mask.shape
    real = attention_mask.bool()
    if position_ids is None:
        position_ids = chunk_positions(attention_mask, cache)
    if cache is None:
        plain = bool(real.all())
        return SelfAttentionMask(position_ids, 0, None, t, real, None if plain else real, plain)
    lo, hi = min(cache.lengths), max(cache.lengths)
    end = hi + t
    if end > cache.max_len:
        raise ValueError(f"sequence of {end} tokens exceeds the cache length {cache.max_len}")
    device = cache.key_mask.device
    if lo == hi:  # every row at the same length (a left-padded batch): plain slices
        start, index = lo, None
        cache.key_mask[:, lo:end] = real
    else:
        start = None
        index = torch.tensor(cache.lengths, device=device)[:, None] + torch.arange(t, device=device)  # (B, T)
        cache.key_mask[torch.arange(b, device=device)[:, None], index] = real
    cache.next_position += attention_mask.long().sum(1)
    keys = cache.key_mask[:, :end]
    plain = start is not None and (start == 0 or t == 1) and bool(keys.all())  # plain causal / full
    return SelfAttentionMask(position_ids, start, index, end, real, keys, plain)


def query_rows_mask(mask: torch.Tensor | None, queries: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The rows of a (B, 1, T, S) mask for query positions ``queries`` (B, K): (B, 1, K, S). A
    ``None`` mask is causal: a query sees the keys up to its own position."""
    if mask is None:
        keys = torch.arange(num_keys, device=queries.device)
        return (keys[None, None, :] <= queries[:, :, None])[:, None]
    return select_rows(mask.squeeze(1), queries).unsqueeze(1)


def visible_images(placeholders: torch.Tensor, num_images: int, span: str = "preceding") -> torch.Tensor:
    """Which images each token may read, from placeholder positions: (B, T) bool -> (B, T, N) bool.

    ``preceding``: image i is visible from its placeholder on. ``latest``: only the most recent
    placeholder group (consecutive placeholders form one group), as Llama 3.2 Vision's processor
    builds its cross-attention mask. ``latest_image``: only the most recent image (IDEFICS's
    processor: a token reads the image whose placeholder is the last at or before it).
    """
    b, t = placeholders.shape
    seen = placeholders.long().cumsum(1)  # (B, T) images whose placeholder is at or before each token
    image = torch.arange(num_images, device=placeholders.device)
    visible = image[None, None, :] < seen[:, :, None]  # (B, T, N)
    if span == "latest_image":
        return image[None, None, :] == seen[:, :, None] - 1
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
