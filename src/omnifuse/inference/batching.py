"""A running batch of independent requests (the core of continuous batching).

Each request is prefilled alone into its own cache, then inserted into a free row of the batch's
cache; every ``step`` decodes one token for all active rows at once, each row at its own length
and position. A request's tokens do not depend on what else shares the batch, or on when it joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnifuse.errors import BatchFullError, ContextOverflowError, RequestError
from omnifuse.inference.cache import InferenceCache
from omnifuse.inference.sampling import SamplingConfig, sample_next

__all__ = ["DecodeBatch", "Request"]


@dataclass
class Request:
    row: int
    tokens: list[int] = field(default_factory=list)  # generated so far, a final stop token included
    done: bool = False


class DecodeBatch:
    """``add(prompt_ids, images)`` prefills a request and places it in a free row; ``step()``
    decodes one token for every unfinished request; finished rows are freed for new requests."""

    def __init__(self, model, max_rows: int, max_len: int, sampling: SamplingConfig = SamplingConfig()) -> None:
        self.model, self.sampling, self.max_len = model, sampling, max_len
        self.cache: InferenceCache = model.new_cache(max_rows, max_len)
        self.requests: dict[int, Request] = {}
        self._last = torch.zeros(max_rows, dtype=torch.long, device=model.device)  # each row's latest token
        self._stops = set(sampling.stop_token_ids)
        self._generator = None
        if sampling.temperature > 0:
            self._generator = torch.Generator(device=model.device)
            self._generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    @property
    def free_rows(self) -> list[int]:
        return [r for r in range(self.cache.self_attn.batch_size) if r not in self.requests]

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], images=None) -> Request:
        """Prefill ``prompt_ids`` (with its processed images) alone, insert it into a free row and
        sample its first token."""
        free = self.free_rows
        if not free:
            raise BatchFullError(f"the batch is full ({len(self.requests)} requests); wait for a request to finish")
        if not prompt_ids:
            raise RequestError("a prompt needs at least one token")
        if len(prompt_ids) >= self.max_len:
            raise ContextOverflowError(f"the prompt is {len(prompt_ids)} tokens but the batch's cache length is "
                                       f"{self.max_len} (at most {self.max_len - 1} prompt tokens)")
        own = self.model.new_cache(1, len(prompt_ids))
        ids = torch.tensor([prompt_ids], device=self.model.device)
        logits = self.model(ids, images=[list(images)] if images else None, cache=own, last_only=True)[:, -1]
        request = Request(free[0])
        self.cache.insert(request.row, own)
        self.requests[request.row] = request
        self._accept(request, int(sample_next(logits, self.sampling, self._generator)[0]))
        return request

    def _accept(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        self._last[request.row] = token
        if token in self._stops or len(request.tokens) >= self.sampling.max_new_tokens:
            request.done = True

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One decode step for every unfinished request; returns them (with their new token)."""
        running = [r for r in self.requests.values() if not r.done]
        if not running:
            return []
        rows = torch.tensor([r.row for r in running], device=self._last.device)
        full = [r.row for r in running if self.cache.self_attn.lengths[r.row] >= self.max_len]
        if full:  # prompt + max_new_tokens is more than the cache holds
            raise ContextOverflowError(f"rows {full} hold {self.max_len} tokens, the batch's cache length; "
                                       "remove them or build the batch with a larger max_len")
        active = torch.zeros(self._last.shape[0], 1, dtype=torch.long, device=self._last.device)
        active[rows] = 1  # idle and finished rows take no step: their length and position stay
        logits = self.model(self._last[:, None], active, cache=self.cache, last_only=True)[:, -1]
        tokens = sample_next(logits[rows], self.sampling, self._generator)
        for request, token in zip(running, tokens.tolist()):
            self._accept(request, token)
        return running

    @torch.inference_mode()
    def remove(self, request: Request) -> None:
        """Free a request's row for another one."""
        self.requests.pop(request.row)
        self.cache.release(request.row)
