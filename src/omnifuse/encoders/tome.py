"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Inside each encoder layer, between attention and the MLP, the tokens are split alternately into
two sets A and B; every A token finds its most similar B token (cosine similarity of the
attention keys, averaged over heads); the ``r`` A tokens with the most similar matches are merged
into them as size-weighted averages. Each token remembers how many patches it holds (its size),
and attention adds log(size) to its logits ("proportional attention") so a merged token weighs as
much as the patches it replaced. Protected tokens (the class token) are never merged, and the
tokens left keep their order. No training is needed. The count after each layer is a pure
function of the count before it (``merged_tokens``), which the processor's ``num_tokens`` uses.
"""

from __future__ import annotations

import torch


def merge_count(tokens: int, r: int, protected: int = 0) -> int:
    """Tokens one layer merges away: r, but at most half of the unprotected ones."""
    return max(0, min(r, (tokens - protected) // 2))


def merged_tokens(tokens: int, r: int, layers: int, protected: int = 0) -> int:
    """Tokens left after ``layers`` layers each merging up to ``r``."""
    for _ in range(layers):
        tokens -= merge_count(tokens, r, protected)
    return tokens


class Merge:
    """One layer's matching, applied to any per-token tensor of the same batch."""

    def __init__(self, metric: torch.Tensor, r: int, protected: int) -> None:
        # metric: (B, N, C) the keys, head-averaged; sets A = even positions, B = odd positions
        with torch.no_grad():
            m = metric / metric.norm(dim=-1, keepdim=True)
            scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
            if protected:
                scores[:, :protected] = float("-inf")  # the class token (position 0) is in A
            best, match = scores.max(dim=-1)  # each A token's most similar B token
            order = best.argsort(dim=-1, descending=True)  # (B, |A|)
            self.src = order[:, :r]  # A tokens merged away
            self.dst = match.gather(1, self.src)  # the B token each merges into
            self.keep = order[:, r:].sort(dim=-1).values  # the A tokens that stay
            # Every token left keeps its place in the sequence (the reference implementation puts
            # the kept A tokens first, then B): a decoder that reads image tokens in order (early
            # fusion, RoPE positions) sees the layout it was trained on; the class token stays first.
            n_b = metric.shape[1] // 2
            places = torch.cat([2 * self.keep, 2 * torch.arange(n_b, device=metric.device).expand(len(order), -1) + 1],
                               dim=1)
            self.place = places.argsort(dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum each merged A token into its B token: (B, N, C) -> (B, N - r, C), in the tokens'
        original order."""
        a, b = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        kept = a.gather(1, self.keep[..., None].expand(-1, -1, c))
        moved = a.gather(1, self.src[..., None].expand(-1, -1, c))
        b = b.scatter_add(1, self.dst[..., None].expand(-1, -1, c), moved)
        return torch.cat([kept, b], dim=1).gather(1, self.place[..., None].expand(-1, -1, c))

    def weighted(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of merged tokens: (x, size) -> (merged x, merged size)."""
        total = self(size)
        return self(x * size) / total, total
