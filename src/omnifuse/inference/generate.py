"""Batched, KV-cached generation with left padding and streaming."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from omnifuse.errors import ContextOverflowError, RequestError
from omnifuse.inference.sampling import SamplingConfig, sample_next


@dataclass
class Step:
    """One decoding step for a batch: the new token of every row and which rows are done."""

    tokens: torch.Tensor  # (B,) ids; rows finished earlier repeat the pad id
    finished: torch.Tensor  # (B,) bool, True once a row produced a stop token (inclusive)
    active: torch.Tensor  # (B,) bool, True where ``tokens`` is a real new token of that row


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids (B, T) and attention_mask (B, T), padding on the left."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, t - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, t - len(r):] = 1
    return ids, mask


@torch.inference_mode()
def generate_stream(model, prompts: list[list[int]], images=None, cfg: SamplingConfig = SamplingConfig(),
                    pad_id: int = 0) -> Iterator[Step]:
    """Prefill the left-padded batch once, then decode one token per step from the KV cache.

    ``images``: one list of processed images per prompt (or None). Stops when every row has
    produced a stop token or ``max_new_tokens`` steps ran. New tokens are capped so the sequence
    fits the context; a prompt that alone fills the context raises ``ContextOverflowError``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RequestError("every prompt needs at least one token")
    context = model.config.decoder.max_position
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ContextOverflowError(f"the prompt is {longest} tokens (text and image tokens) but the context "
                                   f"length is {context}; shorten the prompt or use fewer/smaller images")
    steps = min(cfg.max_new_tokens, context - longest)
    if steps <= 0:
        return
    device = model.device
    input_ids, attention_mask = (x.to(device) for x in left_pad(prompts, pad_id))
    b = len(prompts)
    cache = model.new_cache(b, longest + steps)
    generator = None
    if cfg.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    stop = torch.tensor(cfg.stop_token_ids or [-1], device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    logits = model(input_ids, attention_mask, images=images, cache=cache, last_only=True)[:, -1]
    step_mask = torch.ones(b, 1, dtype=torch.long, device=device)
    for i in range(steps):
        token = sample_next(logits, cfg, generator)
        active = ~finished
        token = torch.where(active, token, torch.full_like(token, pad_id))
        finished = finished | (active & torch.isin(token, stop))
        yield Step(token, finished.clone(), active)
        if bool(finished.all()) or i == steps - 1:
            return
        logits = model(token[:, None], step_mask, cache=cache, last_only=True)[:, -1]


def generate(model, prompts: list[list[int]], images=None, cfg: SamplingConfig = SamplingConfig(),
             pad_id: int = 0, include_stop: bool = False) -> list[list[int]]:
    """Generated ids per row (stop token excluded unless ``include_stop``)."""
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(cfg.stop_token_ids)
    for step in generate_stream(model, prompts, images, cfg, pad_id):
        for r in range(len(prompts)):
            if bool(step.active[r]):
                tok = int(step.tokens[r])
                if tok not in stops or include_stop:
                    out[r].append(tok)
    return out
