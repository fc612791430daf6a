"""The OpenAI-compatible HTTP server (FastAPI): routes, media, usage, streaming, metrics, hardening.

``create_app(pipeline, settings)`` returns the ASGI app; ``omnifuse serve`` runs it with uvicorn.
Requests are validated against ``schemas.py`` and turned into token ids and processed media in a
worker thread (decoding media is CPU work), then queued on the ``Engine`` (continuous batching).
Every error a client can cause is a 4xx in OpenAI's format ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnifuse.errors import USER_ERRORS, BatchFullError, ContextOverflowError
from omnifuse.serving.engine import Engine, EngineRequest, Event, Params
from omnifuse.serving.media import MediaError, MediaLimits, check_image, decode_base64, digest, read_reference
from omnifuse.serving.memory import mmap_large_allocations, release_heap
from omnifuse.serving.schemas import ChatRequest, CompletionRequest, Message

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("omnifuse.serve")


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "omnifuse"
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None
    kv_cache_bytes: int | None = None
    encoder_cache_bytes: int = 256 << 20
    prefix_cache_bytes: int = 256 << 20
    api_key: str | None = None
    media_root: Path | None = None
    max_body_bytes: int = 32 << 20
    limits: MediaLimits = field(default_factory=MediaLimits)


_LARGE_BODY = 1 << 20  # bytes: a body this big is followed by release_heap once no other is in flight


class _ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ------------------------------------------------------------------ request -> ids and media

@dataclass
class Prepared:
    prompt_ids: list[int]
    items: list
    digests: list[str | None]
    media_tokens: dict[str, int]  # modality -> tokens its items produce


@dataclass
class _Gathered:
    """A chat request read and checked, nothing processed yet: messages with a placeholder where
    each media part was, and the parts (modality, bytes, what the processor reads: the bytes, or an
    image opened with its header checked; where in the request)."""

    messages: list[dict]
    parts: list[tuple[str, bytes, Any, str]]


class _Preparer:
    """Turns validated requests into token ids and processed media items, in two steps: ``gather``
    (a worker thread: bytes, base64, the media root, limits and image headers; no torch) and
    ``process`` (the engine thread, the only one that runs torch: see ``engine.on_fresh_thread``)."""

    def __init__(self, pipeline, settings: ServeSettings) -> None:
        import dataclasses

        self.pipe, self.settings, self.limits = pipeline, settings, settings.limits
        # Every processing and encoder setting, serialised once (each media item's cache key holds it).
        self.settings_of = json.dumps(dataclasses.asdict(pipeline.model.config), sort_keys=True, default=str)

    def _item(self, modality: str, data: bytes, source: Any, param: str):
        limits, pipe = self.limits, self.pipe
        options: dict[str, Any] = {}
        if modality == "video":
            options["max_frames"] = limits.max_video_frames
        try:
            item = pipe.process(modality, [source], **options)[0]
        except USER_ERRORS as e:
            raise MediaError(f"{param}: {e}", param) from None
        if modality == "audio" and item.seconds > limits.max_audio_seconds:
            raise MediaError(f"{param}: the audio is {item.seconds:.1f} s, more than the {limits.max_audio_seconds:g} s "
                             "allowed (--max-audio-seconds)", param)
        key = digest(modality, data, {"settings": self.settings_of, "options": options})
        return item, key

    def _media_bytes(self, part, where: str) -> tuple[str, bytes]:
        limit = self.limits.max_media_bytes
        if part.type == "image_url":
            return "image", read_reference(part.image_url.url, f"{where}.image_url.url", self.settings.media_root, limit)
        if part.type == "video_url":
            return "video", read_reference(part.video_url.url, f"{where}.video_url.url", self.settings.media_root, limit)
        return "audio", decode_base64(part.input_audio.data, f"{where}.input_audio.data", limit)

    def gather(self, body: ChatRequest) -> _Gathered:
        messages, parts = [], []
        for i, message in enumerate(body.messages):
            messages.append({"role": "system" if message.role == "developer" else message.role,
                             "content": self._content(message, i, parts)})
        return _Gathered(messages, parts)

    def _content(self, message: Message, i: int, parts: list) -> str:
        """The message's text with each media part's placeholder where the part was; the parts are
        appended to ``parts`` (the conversation's so far)."""
        if isinstance(message.content, str):
            return message.content
        text = ""
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                text += part.text
                continue
            if message.role != "user":
                raise MediaError(f"{where}: media parts go in user messages, not {message.role}", where)
            if len(parts) >= self.limits.max_media:
                raise MediaError(f"{where}: more than {self.limits.max_media} media parts in one request "
                                 "(--max-media)", where)
            modality, data = self._media_bytes(part, where)
            if modality not in self.pipe.layout.tokens:
                kinds = ", ".join(self.pipe.layout.tokens) or "no media (it is a text-only model)"
                raise MediaError(f"{where}: {self.settings.model_name} takes {kinds}, not {modality}", where)
            # An image's header only: one over the pixel limit is never decoded.
            source = check_image(data, where, self.limits) if modality == "image" else data
            parts.append((modality, data, source, where))
            text += self.pipe.layout.tokens[modality]
        return text

    def process(self, gathered: _Gathered) -> Prepared:
        media: dict[str, list] = {}
        keys: dict[str, list] = {}
        for modality, data, source, where in gathered.parts:
            item, key = self._item(modality, data, source, where)
            media.setdefault(modality, []).append(item)
            keys.setdefault(modality, []).append(key)
        ids, items, order = self.pipe.conversation_and_media(gathered.messages, media)
        return self._prepared(ids, items, [keys[m][k] for m, k in order])

    def completion(self, prompt: str) -> Prepared:
        ids, items = self.pipe.prompt_and_media(prompt, {})
        return self._prepared(ids, items, [])

    def _prepared(self, ids, items, keys) -> Prepared:
        tokens: dict[str, int] = {}
        for item in items:
            tokens[item.modality] = tokens.get(item.modality, 0) + item.num_tokens
        return Prepared(ids, items, keys, tokens)


# ------------------------------------------------------------------ the app

def _metrics(registry):
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "requests": Counter("omnifuse_requests", "HTTP requests answered", ["endpoint", "status"], registry=registry),
        "prompt_tokens": Counter("omnifuse_prompt_tokens", "Prompt tokens processed", registry=registry),
        "generation_tokens": Counter("omnifuse_generation_tokens", "Tokens generated", registry=registry),
        "queue": Gauge("omnifuse_queue_depth", "Requests waiting for a row", registry=registry),
        "running": Gauge("omnifuse_running_batch", "Requests in the running batch", registry=registry),
        "ttft": Histogram("omnifuse_time_to_first_token_seconds", "Arrival to first token", registry=registry,
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        "tpot": Histogram("omnifuse_time_per_output_token_seconds", "Mean time between a request's tokens",
                          registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)),
        "encoder_hits": Gauge("omnifuse_encoder_cache_hits", "Media whose encoder output was reused",
                              registry=registry),
        "encoder_misses": Gauge("omnifuse_encoder_cache_misses", "Media encoded", registry=registry),
        "prefix_hits": Gauge("omnifuse_prefix_cache_hits", "Prompts started from a kept prefix", registry=registry),
        "prefix_misses": Gauge("omnifuse_prefix_cache_misses", "Prompts with media prefilled whole",
                               registry=registry),
    }


class _Stream:
    """A request's events, handed from the engine thread to the event loop as (choice index, event)
    on ``queue`` (the ``n`` choices of one streamed response share one queue)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None = None, index: int = 0) -> None:
        self.loop, self.queue, self.index = loop, queue if queue is not None else asyncio.Queue(), index

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))


def _deliver(batch: list[tuple[EngineRequest, Event]]) -> None:
    """The events of one engine step, handed to their event loop in one wake-up (not one per
    request: each wake-up is a thread switch that can preempt a decode step's OpenMP threads)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for request, event in batch:
        stream = request.on_event
        if isinstance(stream, _Stream):
            by_loop.setdefault(stream.loop, []).append((stream.queue, (stream.index, event)))
        else:
            stream(event)
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def create_app(pipeline, settings: ServeSettings | None = None):
    """The server's ASGI app around ``pipeline`` (its engine starts with the app and stops with it)."""
    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import run_in_threadpool

    settings = settings or ServeSettings()
    mmap_large_allocations()
    engine = Engine(pipeline.model, pipeline.tokenizer, max_batch=settings.max_batch, context=settings.context,
                    max_queue=settings.max_queue, kv_cache_bytes=settings.kv_cache_bytes,
                    encoder_cache_bytes=settings.encoder_cache_bytes, prefix_cache_bytes=settings.prefix_cache_bytes,
                    deliver=_deliver)
    preparer = _Preparer(pipeline, settings)
    registry = CollectorRegistry()
    metrics = _metrics(registry)
    metrics["queue"].set_function(lambda: engine.queue_depth)
    metrics["running"].set_function(lambda: engine.running_rows)
    metrics["encoder_hits"].set_function(lambda: engine.encoder_cache.hits)
    metrics["encoder_misses"].set_function(lambda: engine.encoder_cache.misses)
    metrics["prefix_hits"].set_function(lambda: engine.prefix_cache.hits)
    metrics["prefix_misses"].set_function(lambda: engine.prefix_cache.misses)
    created = int(time.time())
    replica = f"{socket.gethostname()}:{os.getpid()}"  # which server answered, behind a load balancer

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="omnifuse", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multimodal chat and completions")
    app.state.engine, app.state.settings = engine, settings

    # -------------------------------------------------------------- hardening middleware (pure ASGI)
    def _json(status: int, body: dict, headers: dict | None = None):
        return JSONResponse(body, status_code=status, headers=headers)

    class _Guard:
        """Body size limit (413, also for bodies that lie about or omit their length) and API key (401)."""

        def __init__(self, app) -> None:
            self.asgi = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.asgi(scope, receive, send)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            path = scope.get("path", "")
            if settings.api_key and path.startswith("/v1"):
                given = headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                    response = _json(401, _error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                                      "authentication_error", code="invalid_api_key"),
                                     {"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send)
            limit = settings.max_body_bytes
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                response = _json(413, _error_body(f"the request body is larger than {limit:,} bytes",
                                                  "invalid_request_error", code="request_too_large"))
                return await response(scope, receive, send)
            seen = 0

            async def counted():  # a body without (or lying about) its length is counted as it arrives
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    before = seen
                    seen += len(message.get("body", b""))
                    if before <= _LARGE_BODY < seen:
                        large["in_flight"] += 1
                    if seen > limit:
                        raise _BodyTooLarge(limit)
                return message

            try:
                await self.asgi(scope, counted, send)
            finally:
                if seen > _LARGE_BODY:
                    _large_done()

    large = {"in_flight": 0, "release": None}

    def _large_done() -> None:
        # Big bodies (base64 media) leave freed heap that glibc keeps, some of it only once the cyclic
        # collector has run (an error's traceback holds the body). A second after the last of them is
        # answered: collect, and hand the free heap back to the OS, so a burst of big requests does
        # not raise the server's memory for good.
        large["in_flight"] -= 1
        if large["in_flight"] == 0 and large["release"] is None:
            large["release"] = asyncio.get_running_loop().call_later(1.0, _release)

    def _release() -> None:
        large["release"] = None
        if large["in_flight"] == 0:
            release_heap()

    app.add_middleware(_Guard)

    # -------------------------------------------------------------- errors in OpenAI's format
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # Of a union's alternatives, the one that got furthest says most (a bad part, not "not a string").
        first = max(errors, key=lambda e: (len(e.get("loc", ())), not str(e.get("type")).endswith("_type"))) \
            if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_type_name(x)]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        _count(request, 400)
        return _json(400, _error_body(message, "invalid_request_error", ".".join(loc) or None))

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError):
        _count(request, exc.status)
        return _json(exc.status, _error_body(exc.message, exc.type, exc.param, exc.code), exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        _count(request, exc.status_code)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return _json(exc.status_code, _error_body(str(exc.detail), type_, code=code), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: logged, answered, never a stack trace out
        log.exception("internal error")
        _count(request, 500)
        return _json(500, _error_body("internal server error", "server_error"))

    def _count(request: Request, status: int) -> None:
        metrics["requests"].labels(request.url.path, str(status)).inc()

    def _user_error(e: Exception) -> _ApiError:
        if isinstance(e, BatchFullError):
            return _ApiError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        if isinstance(e, ContextOverflowError):  # the prompt alone, or the prompt with max_tokens
            param = "max_tokens" if "max_tokens" in str(e) else "messages"
            return _ApiError(400, str(e), param=param, code="context_length_exceeded")
        return _ApiError(400, str(e), param=getattr(e, "param", None))

    # -------------------------------------------------------------- generation core
    def _check_model(name: str) -> None:
        if name != settings.model_name:
            raise _ApiError(404, f"model {name!r} is not served here; this server serves {settings.model_name!r}",
                            "not_found_error", "model", "model_not_found")

    def _params(body, prepared: Prepared, index: int) -> Params:
        try:
            max_tokens = engine.check(prepared.prompt_ids, body.token_limit())
        except USER_ERRORS as e:
            raise _user_error(e) from None
        seed = None if body.seed is None else body.seed + index
        return Params(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, seed=seed, stop=body.stop_strings(),
                      stop_token_ids=tuple(pipeline.stop_token_ids))

    async def _prepare(fn, *args, on_engine: Callable | None = None) -> Prepared:
        """``fn(*args)`` in a worker thread; then ``on_engine`` of its result on the engine thread."""
        try:
            out = await run_in_threadpool(fn, *args)
            return out if on_engine is None else await asyncio.wrap_future(engine.call(on_engine, out))
        except MediaError as e:
            raise _ApiError(400, str(e), param=e.param) from None
        except USER_ERRORS as e:
            raise _user_error(e) from None

    def _submit(prepared: Prepared, params: Params, stream: _Stream) -> EngineRequest:
        request = EngineRequest(prepared.prompt_ids, prepared.items, params, on_event=stream, digests=prepared.digests)
        try:
            return engine.submit(request)
        except USER_ERRORS as e:
            raise _user_error(e) from None

    def _usage(prepared: Prepared, completion: int, cached: int) -> dict:
        cost = pipeline.cache_bytes(prepared.prompt_ids, prepared.items, completion)
        details = {"cached_tokens": cached, **{f"{m}_tokens": n for m, n in prepared.media_tokens.items()}}
        if not pipeline.model.fusion.in_sequence and prepared.items:
            details["cross_attention_states"] = cost.cross_attention_states_prefill
        return {"prompt_tokens": len(prepared.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prepared.prompt_ids) + completion, "prompt_tokens_details": details}

    def _observe(request: EngineRequest) -> None:
        metrics["generation_tokens"].inc(len(request.tokens))
        if request.first_token_at is not None:
            metrics["ttft"].observe(request.first_token_at - request.arrived)
            if len(request.tokens) > 1 and request.finished_at is not None:
                metrics["tpot"].observe((request.finished_at - request.first_token_at) / (len(request.tokens) - 1))

    async def _run(http: Request, body, prepared: Prepared, kind: str):
        loop = asyncio.get_running_loop()
        params = [_params(body, prepared, i) for i in range(body.n)]
        shared = asyncio.Queue() if body.stream else None
        streams = [_Stream(loop, shared, i) for i in range(len(params))]
        requests: list[EngineRequest] = []
        try:
            for p, s in zip(params, streams):
                requests.append(_submit(prepared, p, s))
        except _ApiError:  # the queue filled between choices: none of them runs
            for r in requests:
                r.cancel()
            raise
        metrics["prompt_tokens"].inc(len(prepared.prompt_ids))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            return EventSourceResponse(_sse(http, body, prepared, kind, rid, requests, shared), ping=15, sep="\n")
        try:
            finals = await asyncio.gather(*(_collect(http, s, r) for s, r in zip(streams, requests)))
        finally:
            for r in requests:
                r.cancel()  # a no-op once finished; frees the rows of a client that left
        choices, completion, cached = [], 0, 0
        for i, (text, reason, request) in enumerate(finals):
            completion += len(request.tokens)
            cached = max(cached, request._cached_tokens)
            _observe(request)
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        _count(http, 200)
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
                "model": settings.model_name, "choices": choices, "usage": _usage(prepared, completion, cached),
                "system_fingerprint": None}

    async def _collect(http: Request, stream: _Stream, request: EngineRequest):
        text = ""
        while True:
            try:
                _, event = await asyncio.wait_for(stream.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                continue
            if event.finish_reason is None:
                text += event.text
                continue
            if event.finish_reason == "error":
                raise _ApiError(400 if not (event.error or "").startswith("internal") else 500,
                                event.error or "generation failed", "invalid_request_error")
            return text, "length" if event.finish_reason == "length" else "stop", request

    async def _sse(http: Request, body, prepared: Prepared, kind: str, rid: str, requests, events: asyncio.Queue):
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, delta: str | None, reason: str | None, first: bool = False) -> str:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": index, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": reason, "logprobs": None}
            out = {"id": rid, "object": obj, "created": created, "model": settings.model_name, "choices": [choice]}
            if body.stream_options and body.stream_options.include_usage:
                out["usage"] = None
            return json.dumps(out, ensure_ascii=False)

        try:
            if kind == "chat":
                for i in range(len(requests)):
                    yield chunk(i, None, None, first=True)
            done, completion, cached = 0, 0, 0
            while done < len(requests):
                i, event = await events.get()
                if event.finish_reason is None:
                    if event.text:
                        yield chunk(i, event.text, None)
                    continue
                done += 1
                request = requests[i]
                completion += len(request.tokens)
                cached = max(cached, request._cached_tokens)
                _observe(request)
                if event.finish_reason == "error":
                    yield json.dumps(_error_body(event.error or "generation failed", "server_error"))
                    return
                yield chunk(i, None, "length" if event.finish_reason == "length" else "stop")
            if body.stream_options and body.stream_options.include_usage:
                yield json.dumps({"id": rid, "object": obj, "created": created, "model": settings.model_name,
                                  "choices": [], "usage": _usage(prepared, completion, cached)})
            yield "[DONE]"
            _count(http, 200)
        finally:  # the client went away (or the stream ended): free the rows now
            for r in requests:
                r.cancel()

    # -------------------------------------------------------------- routes
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: Request):
        _check_model(body.model)  # before any media is decoded
        prepared = await _prepare(preparer.gather, body, on_engine=preparer.process)
        return await _run(http, body, prepared, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        _check_model(body.model)
        prompts = body.prompts()
        if len(prompts) > 1:
            raise _ApiError(400, "one prompt per request (send several requests; they are batched together)",
                            param="prompt")
        prepared = await _prepare(preparer.completion, prompts[0])
        return await _run(http, body, prepared, "completion")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "omnifuse"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running_rows, "waiting": engine.queue_depth, "replica": replica}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _is_type_name(part) -> bool:
    """pydantic's names for union branches in an error location (``str``, ``list[...]``)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


class _BodyTooLarge(StarletteHTTPException):
    """Raised while the body arrives; an HTTPException so that FastAPI's body parsing passes it on."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit:,} bytes")
