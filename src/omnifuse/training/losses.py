"""Training losses: next-token cross-entropy and the two contrastive image-text losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE", "answer_positions", "clip_loss", "next_token_loss", "selected_token_loss", "siglip_loss"]

IGNORE = -100  # label of positions that carry no loss (prompt, media, padding)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``labels[t + 1]`` from position t. logits: (B, T, V); labels: (B, T).
    ``reduction="sum"`` lets the caller normalise by the token count of a whole (global) batch."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits next-token loss reads, and their targets: labels (B, T) ->
    positions, targets (B, K), K the most any row has. Position t predicts labels[t + 1]; a row
    with fewer pads with its first position and target IGNORE (no loss)."""
    b, t = labels.shape
    if t < 2:
        return torch.zeros(b, 1, dtype=torch.long), torch.full((b, 1), IGNORE, dtype=labels.dtype)
    wanted = labels[:, 1:] != IGNORE  # (B, T-1)
    count = wanted.sum(1, keepdim=True)  # (B, 1)
    k = max(int(count.max()), 1)
    order = torch.argsort((~wanted).to(torch.int8), dim=1, stable=True)[:, :k]  # wanted positions first, in order
    valid = torch.arange(k)[None, :] < count  # (B, K)
    positions = torch.where(valid, order, order[:, :1])
    return positions, torch.where(valid, labels[:, 1:].gather(1, order), IGNORE)


def selected_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of logits (B, K, V) computed at ``answer_positions`` against their targets (B, K)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP InfoNCE (Radford et al. 2021): symmetric cross-entropy over the in-batch similarity
    matrix; the i-th image matches the i-th text. image_emb, text_emb: (N, D); logit_scale: log temperature."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # (N, N)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023): an independent binary logistic loss per image-text pair,
    +1 on the diagonal and -1 elsewhere, summed over pairs and averaged over images."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.t() + logit_bias  # (N, N)
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
