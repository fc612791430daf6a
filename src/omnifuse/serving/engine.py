"""The continuous-batching engine behind ``omnifuse serve``.

One thread owns the model and a ``DecodeBatch`` (inference/batching.py: the rows, their cache,
prefill-alone-then-insert and the batched decode step). Between decode steps the engine admits
waiting requests in arrival order (FIFO) while the batch has a free row; every step decodes one
token for all running requests (contract: a request's tokens never depend on what else shares its
batch). A finished or cancelled request leaves at once. On top of the batch the engine keeps the
queue, stop strings, the text each request has been sent, and its events.

The batch's cache is preallocated: ``rows`` rows of ``context`` positions, as many rows as the
KV-cache byte budget holds (``kv_cache_bytes``) up to ``max_batch``. Media encoder outputs are
kept in an LRU cache keyed by each item's digest (its bytes and processing settings) within
``encoder_cache_bytes``: a hit skips the encoder. For in-sequence models the keys and values of a
prompt through its last media item are kept too (``prefix_cache_bytes``), keyed by those ids and
the media's keys: a prompt that begins the same prefills only the rest.

The engine thread is the only long-lived thread of the server that runs torch: requests' media are
processed there too (``Engine.call``), and one-off work elsewhere runs on a thread that exits
(``on_fresh_thread``, which says why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from omnifuse.errors import USER_ERRORS, BatchFullError, ContextOverflowError, RequestError
from omnifuse.inference.batching import DecodeBatch, Request
from omnifuse.inference.sampling import SamplingConfig

__all__ = ["Engine", "EngineRequest", "EngineStopped", "Event", "Params", "on_fresh_thread"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    """One request's generation settings."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop_token_ids=self.stop_token_ids)


@dataclass
class Event:
    """What the engine reports for a request: a text delta (``token`` set), or the end."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    cached_tokens: int = 0  # with the end: prompt tokens from the prefix cache, else media tokens from the encoder cache


@dataclass(eq=False)  # a request is itself: two with the same prompt are still two (and their tensors never compare)
class EngineRequest:
    prompt_ids: list[int]
    items: list  # processed media items in prompt order
    params: Params
    on_event: Callable[[Event], None]
    digests: list[str | None] = field(default_factory=list)  # per item: its encoder-cache key (None: not cached)
    # filled in by the engine
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    _text: str = ""  # text emitted so far
    _slot: Request | None = None  # its row in the batch while it runs
    _cached_tokens: int = 0

    def cancel(self) -> None:
        """Leave the queue or the batch at the engine's next step (a client that went away)."""
        self.cancelled = True


def on_fresh_thread(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` computed on a new thread that then exits (its exception re-raised here).

    libgomp, the OpenMP runtime of torch's CPU wheels, gives every thread that runs a parallel op a
    pool of worker threads of its own, and once it manages more threads than there are cores it
    stops spinning between parallel regions and sleeps on a futex instead: each of a decode step's
    hundreds of ops then pays a sleep and a wake-up (measured on two cores: 1.3x to 2x slower
    decoding, about 190 context switches per token). A pool goes when its thread exits. So the
    server runs torch on one long-lived thread only, the engine's: one-off work on other threads
    (loading the model, allocating the batch) goes through this function.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="omnifuse-setup")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _LRUCache:
    """Values (tensors, or anything with ``nbytes``) by key, least recently used evicted first,
    within ``budget`` bytes: encoder outputs by item digest, prompt prefixes by ids and media."""

    def __init__(self, budget: int) -> None:
        self.budget, self.bytes = budget, 0
        self.entries: OrderedDict[str, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        size = value.nbytes
        if size > self.budget or key in self.entries:
            return
        while self.bytes + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        self.entries[key] = value
        self.bytes += size


class EngineStopped(RuntimeError):
    """Work handed to an engine that stopped before it ran."""


def _run_job(fn: Callable, args: tuple, future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # the caller's to handle (a media error is a 400)
        future.set_exception(e)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, context: int | None = None, max_queue: int = 64,
                 kv_cache_bytes: int | None = None, encoder_cache_bytes: int = 256 << 20,
                 prefix_cache_bytes: int = 256 << 20,
                 on_step: Callable[[Engine], None] | None = None,
                 deliver: Callable[[list[tuple[EngineRequest, Event]]], None] | None = None) -> None:
        """``deliver``: takes the events of one engine step (or one prefill) at once, e.g. to wake
        an event loop once for all of them; by default each goes to its request's ``on_event``."""
        self.model, self.tokenizer = model, tokenizer
        self.context = int(context or model.config.decoder.max_position)
        if self.context > model.config.decoder.max_position:
            raise RequestError(f"context {self.context} exceeds the model's {model.config.decoder.max_position} positions")
        per_row = on_fresh_thread(lambda: model.new_cache(1, self.context).nbytes)  # K/V of one full-length row
        rows = max_batch if kv_cache_bytes is None else min(max_batch, kv_cache_bytes // max(per_row, 1))
        if rows < 1:
            raise RequestError(f"a KV-cache budget of {kv_cache_bytes:,} bytes holds no row: one row of "
                               f"{self.context} positions takes {per_row:,} bytes")
        self.rows, self.max_queue = int(rows), max_queue
        self.batch = on_fresh_thread(DecodeBatch, model, self.rows, self.context)
        self.encoder_cache = _LRUCache(encoder_cache_bytes)
        # Prompts that begin with the same ids and media (the same image asked about again, a
        # conversation that grows) start from the keys and values kept for them: self-attention
        # (in-sequence) models only, for the prompt up to its last media item.
        self.prefix_cache = _LRUCache(prefix_cache_bytes if model.fusion.in_sequence else 0)
        self._placeholders = frozenset(model.placeholder_ids.values())
        self.running: list[EngineRequest] = []  # in the order they were admitted
        self.waiting: deque[EngineRequest] = deque()
        self._jobs: deque[tuple[Callable, tuple, Future]] = deque()  # work for the engine thread (torch)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.on_step = on_step
        self._deliver = deliver
        self._outbox: list[tuple[EngineRequest, Event]] = []
        self.steps = 0

    # ------------------------------------------------------------------ client side (any thread)
    @property
    def cache(self):
        return self.batch.cache

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="omnifuse-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def call(self, fn: Callable, *args) -> Future:
        """``fn(*args)`` on the engine thread, before its next admission and step (a request's
        media processing: torch work belongs on that thread). Runs here when no engine thread runs."""
        future: Future = Future()
        with self._cond:
            if self._thread is not None and not self._stopping:
                self._jobs.append((fn, args, future))
                self._cond.notify_all()
                return future
        _run_job(fn, args, future)
        return future

    def check(self, prompt_ids: Sequence[int], max_tokens: int | None) -> int:
        """The max_tokens a request may take (``None``: up to the context); refuses a prompt that
        leaves no room, or a max_tokens beyond the context, naming the numbers."""
        if not prompt_ids:
            raise RequestError("the prompt has no tokens")
        room = self.context - len(prompt_ids)
        if room < 1:
            raise ContextOverflowError(f"the prompt is {len(prompt_ids)} tokens (text and media) but the context is "
                                       f"{self.context}: shorten it or send fewer or smaller media")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ContextOverflowError(f"max_tokens {max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the "
                                       f"context of {self.context}; at most {room} tokens can follow this prompt")
        return max_tokens

    def submit(self, request: EngineRequest) -> EngineRequest:
        """Queue a request (FIFO); ``BatchFullError`` when the queue is full."""
        self.check(request.prompt_ids, request.params.max_tokens)
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise BatchFullError(f"the queue is full ({len(self.waiting)} waiting requests, at most "
                                     f"{self.max_queue}); retry later")
            self.waiting.append(request)
            self._cond.notify_all()
        return request

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self.waiting or self.running or self._jobs):
                    self._cond.wait()
                if self._stopping:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for job in jobs:
                _run_job(*job)
            try:
                self._admit()
                self._step()
            except Exception as e:  # an engine bug must not leave clients waiting forever
                log.exception("engine step failed")
                for request in [*self.running, *self._drain_waiting()]:
                    self._finish(request, "error", error=f"internal error: {type(e).__name__}: {e}")
                self._drop_finished()
            self._flush()  # the step's events, at once
            if self.on_step is not None:
                self.on_step(self)
        for request in [*self.running, *self._drain_waiting()]:
            self._finish(request, "cancelled", error="the server is shutting down")
        self._flush()
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
        for _, _, future in jobs:
            future.set_exception(EngineStopped("the server is shutting down"))

    def _drain_waiting(self) -> list[EngineRequest]:
        with self._cond:
            out = list(self.waiting)
            self.waiting.clear()
        return out

    def _next_waiting(self) -> EngineRequest | None:
        with self._cond:
            if any(r.cancelled for r in self.waiting):  # clients that left while queued
                for request in [r for r in self.waiting if r.cancelled]:
                    self._finish(request, "cancelled")
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            if not self.waiting or len(self.running) >= self.rows:
                return None
            return self.waiting.popleft()

    def _admit(self) -> None:
        while (request := self._next_waiting()) is not None:
            try:
                token = self._prefill(request)
            except USER_ERRORS as e:  # what the model refuses (a media/placeholder mismatch): that request only
                self._finish(request, "error", error=str(e))
                continue
            except Exception as e:
                log.exception("prefill failed")
                self._finish(request, "error", error=f"internal error: {type(e).__name__}: {e}")
                continue
            finally:
                self._flush()  # its first token now, not after the other prefills
            self._after_token(request, token)
            self._drop_finished()
            self._flush()

    @staticmethod
    def _item_keys(request: EngineRequest) -> list[str | None]:
        """Each item's cache key: its digest (bytes and processing settings), and the prompt it
        reads where its connector reads one (InstructBLIP's instruction); None without a digest."""
        keys = list(request.digests) + [None] * (len(request.items) - len(request.digests))
        for i, (item, key) in enumerate(zip(request.items, keys)):
            instruction = getattr(item, "instruction", None)
            if key is not None and instruction is not None:
                keys[i] = f"{key}:{hashlib.sha256(json.dumps(instruction.tolist()).encode()).hexdigest()}"
        return keys

    def _with_features(self, request: EngineRequest, keys: list[str | None]) -> list:
        items = []
        for item, key in zip(request.items, keys):
            if key is None or item.features is not None:
                items.append(item)
                continue
            features = self.encoder_cache.get(key)
            if features is None:
                features = self.model.media_features([item])[0]
                self.encoder_cache.put(key, features)
            else:
                request._cached_tokens += item.num_tokens
            items.append(dataclasses.replace(item, features=features))
        return items

    def _prefix_key(self, request: EngineRequest, keys: list[str | None]) -> tuple[str | None, int]:
        """The prefix cache's key for the prompt up to (and with) its last media item, and that
        length; (None, 0) where nothing would be kept (no media, a media item without a digest)."""
        if not self.prefix_cache.budget or not keys or None in keys:
            return None, 0
        ids = request.prompt_ids
        end = next((i + 1 for i in range(len(ids) - 1, -1, -1) if ids[i] in self._placeholders), 0)
        if not 0 < end < len(ids):
            return None, 0
        h = hashlib.sha256(json.dumps([ids[:end], keys]).encode())
        return h.hexdigest(), end

    @torch.inference_mode()
    def _prefill(self, request: EngineRequest) -> int:
        """Into the batch (its first token sampled); the request's tokens are its row's."""
        item_keys = self._item_keys(request)
        key, length = self._prefix_key(request, item_keys)
        prefix = self.prefix_cache.get(key) if key is not None else None
        if prefix is not None:  # the media and the ids before them computed already: the rest only
            request._cached_tokens = length
            request._slot = self.batch.add(request.prompt_ids, None, request.params.sampling(), prefix=prefix)
        else:
            request._slot = self.batch.add(request.prompt_ids, self._with_features(request, item_keys),
                                           request.params.sampling(), keep=length)
            if key is not None and request._slot.kept is not None:
                self.prefix_cache.put(key, request._slot.kept)
            request._slot.kept = None
        request.tokens = request._slot.tokens
        self.running.append(request)
        return request.tokens[-1]

    def _step(self) -> None:
        self._drop_cancelled()
        if not self.running:
            return
        by_slot = {r._slot: r for r in self.running}
        for slot in self.batch.step():
            self._after_token(by_slot[slot], slot.tokens[-1])
        self.steps += 1
        self._drop_finished()

    def _after_token(self, request: EngineRequest, token: int) -> None:
        """Stop tokens, stop strings and the length limit; the text the client has not seen yet."""
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        params = request.params
        stopped = token in params.stop_token_ids
        text = self.tokenizer.decode(request.tokens[:-1] if stopped else request.tokens)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
        if stopped or len(request.tokens) >= params.max_tokens:
            self._emit_text(request, text, final=True)
            self._finish(request, "stop" if stopped else "length")
        else:
            self._emit_text(request, text, final=False, token=token)

    def _emit_text(self, request: EngineRequest, text: str, final: bool, token: int | None = None) -> None:
        if not final:
            # Hold back an incomplete UTF-8 character and any tail that may begin a stop string.
            text = text.rstrip("\ufffd")
            hold = max((k for s in request.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if len(text) > len(request._text) and text.startswith(request._text):
            delta = text[len(request._text):]
            request._text = text
            self._emit(request, Event(text=delta, token=token))
        elif token is not None:
            self._emit(request, Event(token=token))

    def _emit(self, request: EngineRequest, event: Event) -> None:
        if self._deliver is None:
            request.on_event(event)
        else:
            self._outbox.append((request, event))

    def _flush(self) -> None:
        if self._outbox:
            out, self._outbox = self._outbox, []
            self._deliver(out)

    def _finish(self, request: EngineRequest, reason: str, error: str | None = None) -> None:
        if request.finished_at is not None:
            return
        request.finished_at = time.perf_counter()
        self._emit(request, Event(finish_reason=reason, error=error, cached_tokens=request._cached_tokens))

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, "cancelled")
        self._drop_finished()

    def _drop_finished(self) -> None:
        for request in [r for r in self.running if r.finished_at is not None]:
            self.batch.remove(request._slot)
            self.running.remove(request)
