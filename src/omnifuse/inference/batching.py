"""A running batch of independent requests (the core of continuous batching).

Each request is prefilled alone into its own cache, then inserted into the lowest free row of the
batch's cache; every ``step`` decodes one token for all active rows at once, each row at its own
length and position, with its own sampling settings. A step computes the rows up to the highest
one in use (through a view of the cache), so it costs the batch's occupancy, not its capacity. A
request's tokens do not depend on what else shares the batch, or on when it joined.

A request may start from a ``Prefix``: the keys and values an earlier prompt with the same first
ids (and media) computed for them; only the rest of its prompt is prefilled (float differences of
order 1e-6 from a whole prefill: a different split of the same sums).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnifuse.errors import BatchFullError, ContextOverflowError, RequestError
from omnifuse.inference.cache import InferenceCache
from omnifuse.inference.sampling import SamplingConfig, sample_next

__all__ = ["DecodeBatch", "Prefix", "Request"]


@dataclass(frozen=True)
class Prefix:
    """The self-attention keys and values of a prompt's first ``length`` positions, every layer's
    (Hkv, length, Dh), to start another prompt with the same first ids and media from."""

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))


@dataclass(eq=False)  # a request is itself: two with the same prompt are still two
class Request:
    row: int
    sampling: SamplingConfig
    tokens: list[int] = field(default_factory=list)  # generated so far, a final stop token included
    done: bool = False
    generator: torch.Generator | None = None  # its own, seeded from sampling.seed, when it samples
    kept: Prefix | None = None  # its first positions' keys and values, when ``add`` was asked to keep them


class DecodeBatch:
    """``add(prompt_ids, images, sampling)`` prefills a request and places it in a free row;
    ``step()`` decodes one token for every unfinished request; ``remove`` frees a row."""

    def __init__(self, model, max_rows: int, max_len: int, sampling: SamplingConfig = SamplingConfig()) -> None:
        """``sampling``: the settings of requests added without their own."""
        self.model, self.sampling, self.max_len = model, sampling, max_len
        self.cache: InferenceCache = model.new_cache(max_rows, max_len)
        self.requests: dict[int, Request] = {}
        self._last = torch.zeros(max_rows, dtype=torch.long, device=model.device)  # each row's latest token

    @property
    def free_rows(self) -> list[int]:
        return [r for r in range(self.cache.self_attn.batch_size) if r not in self.requests]

    @torch.inference_mode()
    def add(self, prompt_ids: list[int], images=None, sampling: SamplingConfig | None = None,
            prefix: Prefix | None = None, keep: int = 0) -> Request:
        """Prefill ``prompt_ids`` (with its processed media items) alone, insert it into the lowest
        free row and sample its first token.

        ``prefix``: the keys and values of ``prompt_ids[:prefix.length]``, every media item inside
        it (``images`` is then not needed): only the rest is prefilled. ``keep``: also keep the first
        ``keep`` positions as the request's ``kept`` prefix, where they can start another prompt
        (self-attention only, every position a real token at its own index, no bounded layer, whose
        ring no longer holds the first positions; else ``kept`` is None)."""
        free = self.free_rows
        if not free:
            raise BatchFullError(f"the batch is full ({len(self.requests)} requests); wait for a request to finish")
        if not prompt_ids:
            raise RequestError("a prompt needs at least one token")
        if len(prompt_ids) >= self.max_len:
            raise ContextOverflowError(f"the prompt is {len(prompt_ids)} tokens but the batch's cache length is "
                                       f"{self.max_len} (at most {self.max_len - 1} prompt tokens)")
        own = self.model.new_cache(1, len(prompt_ids))
        start = 0
        if prefix is not None and own.self_attn.bounded:
            raise RequestError("a model with bounded attention layers (sliding, chunked) cannot start from a prefix")
        if prefix is not None:
            start = prefix.length
            if not 0 < start < len(prompt_ids):
                raise RequestError(f"a prefix of {start} positions cannot start a prompt of {len(prompt_ids)}")
            kv = own.self_attn
            for layer, k, v in zip(kv.layers, prefix.k, prefix.v, strict=True):
                layer.k[0, :, :start] = k
                layer.v[0, :, :start] = v
            kv.key_mask[0, :start] = True
            kv.next_position[0] = kv.lengths[0] = start
            images = None  # inside the prefix
        ids = torch.tensor([prompt_ids[start:]], device=self.model.device)
        logits = self.model(ids, images=[list(images)] if images else None, cache=own, last_only=True)[:, -1]
        request = Request(free[0], sampling or self.sampling)
        kv = own.self_attn
        if 0 < keep < len(prompt_ids) and own.cross is None and not kv.bounded \
                and int(kv.next_position[0]) == len(prompt_ids) and bool(kv.key_mask[0, :keep].all()):
            request.kept = Prefix(tuple(layer.k[0, :, :keep].clone() for layer in kv.layers),
                                  tuple(layer.v[0, :, :keep].clone() for layer in kv.layers))
        if request.sampling.temperature > 0:
            request.generator = torch.Generator(device=self.model.device)
            seed = request.sampling.seed
            request.generator.manual_seed(seed if seed is not None else torch.seed())
        self.cache.insert(request.row, own)
        self.requests[request.row] = request
        self._accept(request, self._sample(logits, [request])[0])
        return request

    @staticmethod
    def _sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
        out = logits.argmax(dim=-1).tolist()  # greedy rows: one argmax for the batch
        for i, request in enumerate(requests):
            if request.generator is not None:
                out[i] = int(sample_next(logits[i:i + 1], request.sampling, request.generator)[0])
        return out

    def _accept(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        self._last[request.row] = token
        if token in request.sampling.stop_token_ids or len(request.tokens) >= request.sampling.max_new_tokens:
            request.done = True

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One decode step for every unfinished request; returns them (with their new token)."""
        running = [r for r in self.requests.values() if not r.done]
        if not running:
            return []
        full = [r.row for r in running if self.cache.self_attn.lengths[r.row] >= self.max_len]
        if full:  # prompt + max_new_tokens is more than the cache holds
            raise ContextOverflowError(f"rows {full} hold {self.max_len} tokens, the batch's cache length; "
                                       "remove them or build the batch with a larger max_len")
        n = max(self.requests) + 1  # rows above the highest in use take no part
        rows = torch.tensor([r.row for r in running], device=self._last.device)
        active = torch.zeros(n, 1, dtype=torch.long, device=self._last.device)
        active[rows] = 1  # idle and finished rows take no step: their length and position stay
        view = self.cache.narrow(n)
        logits = self.model(self._last[:n, None], active, cache=view, last_only=True)[:, -1]
        self.cache.absorb(view)
        for request, token in zip(running, self._sample(logits[rows], running)):
            self._accept(request, token)
        return running

    @torch.inference_mode()
    def remove(self, request: Request) -> None:
        """Free a request's row for another one."""
        self.requests.pop(request.row)
        self.cache.release(request.row)
