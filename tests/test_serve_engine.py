"""The serving engine (continuous batching): a greedy request gets the tokens it gets alone while
others join and leave its batch; rows are freed at once; the encoder cache skips the encoder and
changes nothing; stop strings, queue limits and context limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.errors import BatchFullError, ContextOverflowError
from omnifuse.inference import SamplingConfig, generate
from omnifuse.processing.text import load_tokenizer
from omnifuse.serving.engine import Engine, EngineRequest, Params


def _requests(model, n=6):
    """(prompt ids, images, max tokens): with and without images of different sizes, of different
    lengths, wanting different numbers of tokens (so they leave the batch at different steps)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        sizes = [[(40, 56)], [], [(70, 30), (32, 32)]][k % 3]
        images = [model.image_processor(scene(w, h, 10 * k + i)) for i, (w, h) in enumerate(sizes)]
        ids = torch.randint(0, 256, (3 + 2 * k,), generator=g).tolist()
        for img in images:
            ids += [PLACEHOLDER] * model.fusion.placeholder_tokens(img.num_tokens) + [65, 66]
        out.append((ids, images, 4 + 3 * k))
    return out


def _alone(model, ids, images, n):
    return generate(model, [ids], [images] if images else None, SamplingConfig(max_new_tokens=n), include_stop=True)[0]


def _submit(engine, ids, images, n, events=None):
    request = EngineRequest(ids, images, Params(max_tokens=n), on_event=(events.append if events is not None else
                                                                            lambda _e: None))
    return engine.submit(request)


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_greedy_tokens_do_not_depend_on_who_joins_or_leaves(fusion):
    model = make_model(tiny_config(fusion), gates=0.5)
    tokenizer = load_tokenizer(model.config.text)
    requests = _requests(model)
    expected = [_alone(model, *r) for r in requests]
    assert len({tuple(e) for e in expected}) == len(expected)
    engine = Engine(model, tokenizer, max_batch=3, context=160)
    handles = [_submit(engine, *r) for r in requests[:2]]
    engine._admit()
    for _ in range(2):
        engine._step()
    handles += [_submit(engine, *r) for r in requests[2:]]  # more than the free rows: some wait
    steps_with = []
    while engine.running or engine.waiting:
        engine._admit()
        steps_with.append(len(engine.running))
        engine._step()
    assert max(steps_with) == 3 and min(steps_with) < 3  # the batch filled, and rows left before others
    assert [h.tokens for h in handles] == expected
    assert all(length == 0 for length in engine.cache.self_attn.lengths)  # every row freed


def test_the_engine_thread_serves_concurrent_submitters():
    model = make_model(tiny_config("early"))
    tokenizer = load_tokenizer(model.config.text)
    requests = _requests(model, 4)
    expected = [_alone(model, *r) for r in requests]
    engine = Engine(model, tokenizer, max_batch=2, context=160).start()
    done = [threading.Event() for _ in requests]
    handles: list = [None] * len(requests)

    def client(i):
        handles[i] = EngineRequest(requests[i][0], requests[i][1], Params(max_tokens=requests[i][2]),
                                   on_event=lambda e, i=i: done[i].set() if e.finish_reason else None)
        engine.submit(handles[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    assert all(d.wait(timeout=60) for d in done)
    engine.stop()
    assert [h.tokens for h in handles] == expected


def test_a_cancelled_request_leaves_the_batch_at_the_next_step():
    model = make_model(tiny_config("early"))
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=2, context=160)
    (a_ids, a_img, _), (b_ids, b_img, _) = _requests(model, 2)
    events = []
    a = _submit(engine, a_ids, a_img, 50, events)
    b = _submit(engine, b_ids, b_img, 10)
    engine._admit()
    engine._step()
    a.cancel()
    engine._step()
    assert engine.running == [b] and events[-1].finish_reason == "cancelled"
    assert len(a.tokens) == 2  # the first token at prefill, one step, then gone
    while engine.running:
        engine._step()
    assert b.tokens == _alone(model, b_ids, b_img, 10)


def test_a_hit_in_the_encoder_cache_skips_the_encoder_and_changes_nothing():
    model = make_model(tiny_config("early"))
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=2, context=160, prefix_cache_bytes=0)
    ids, images, n = _requests(model, 1)[0]
    calls = []
    encoder = model.encoders["image"]
    hook = encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        runs = []
        for _ in range(2):
            events = []
            request = EngineRequest(ids, images, Params(max_tokens=n), on_event=events.append, digests=["img-0"])
            engine.submit(request)
            while engine.waiting or engine.running:
                engine._admit()
                engine._step()
            runs.append((request.tokens, events[-1].cached_tokens))
    finally:
        hook.remove()
    assert len(calls) == 1  # the second request's image came from the cache
    assert runs[0][0] == runs[1][0] == _alone(model, ids, images, n)
    assert (runs[0][1], runs[1][1]) == (0, images[0].num_tokens)
    assert engine.encoder_cache.hits == 1 and engine.encoder_cache.misses == 1


def _run(engine, ids, images, n, digests):
    events = []
    request = engine.submit(EngineRequest(ids, images, Params(max_tokens=n), on_event=events.append, digests=digests))
    while engine.waiting or engine.running:
        engine._admit()
        engine._step()
    return request.tokens, events[-1].cached_tokens


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_a_prompt_that_begins_as_an_earlier_one_starts_from_its_keys_and_values(fusion):
    model = make_model(tiny_config(fusion), gates=0.5)
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=2, context=160)
    ids, images, n = _requests(model, 3)[2]  # text, two images, text
    end = len(ids) - 2  # the prompt through its last image
    other = ids[:end] + [70, 71, 72, 73]  # the same text and images, then another question
    before = [ids[0] + 1] + ids[1:]  # another first token: nothing in common but the images
    calls = []
    hook = model.encoders["image"].register_forward_hook(lambda *_: calls.append(1))
    try:
        first = _run(engine, ids, images, n, ["a", "b"])
        again = _run(engine, ids, images, n, ["a", "b"])
        asked = _run(engine, other, images, n, ["a", "b"])
        moved = _run(engine, before, images, n, ["a", "b"])
        changed = _run(engine, ids, images[::-1], n, ["b", "a"])  # other media at the same places
    finally:
        hook.remove()
    assert first[0] == again[0] == _alone(model, ids, images, n)
    assert asked[0] == _alone(model, other, images, n)
    assert moved[0] == _alone(model, before, images, n)
    assert changed[0] == _alone(model, ids, images[::-1], n)
    if fusion == "early":
        assert [c for _, c in (first, again, asked)] == [0, end, end]  # the prefix's tokens came from the cache
        media = sum(i.num_tokens for i in images)
        assert moved[1] == changed[1] == media  # prefix misses; the encoder cache's hits
        assert engine.prefix_cache.hits == 2 and len(engine.prefix_cache.entries) == 3
        assert len(calls) == 2  # each image encoded once
    else:  # its media are not in the sequence: no prefix is kept
        assert engine.prefix_cache.budget == 0 and not engine.prefix_cache.entries


def test_the_encoder_cache_evicts_the_least_recently_used_within_its_budget():
    from omnifuse.serving.engine import _LRUCache

    cache = _LRUCache(budget=3 * 400)
    for k in "abc":
        cache.put(k, torch.zeros(100))  # 400 bytes each
    cache.get("a")
    cache.put("d", torch.zeros(100))
    assert list(cache.entries) == ["c", "a", "d"] and cache.bytes == 1200
    cache.put("huge", torch.zeros(1000))  # larger than the whole budget: not kept
    assert "huge" not in cache.entries


def test_stop_strings_end_the_text_before_them():
    model = make_model(tiny_config("early"))
    tokenizer = load_tokenizer(model.config.text)
    ids, images, _ = _requests(model, 1)[0]
    free = _alone(model, ids, images, 12)
    text = tokenizer.decode(free)
    stop = text[3:5]
    engine = Engine(model, tokenizer, max_batch=1, context=160)
    events = []
    request = EngineRequest(ids, images, Params(max_tokens=12, stop=(stop,)), on_event=events.append)
    engine.submit(request)
    while engine.waiting or engine.running:
        engine._admit()
        engine._step()
    streamed = "".join(e.text for e in events)
    assert streamed == text[:text.find(stop)] and events[-1].finish_reason == "stop"


def test_queue_and_context_limits_are_named():
    model = make_model(tiny_config("early"))
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=1, max_queue=1, context=40)
    _submit(engine, [1, 2, 3], [], 5)
    with pytest.raises(BatchFullError, match="the queue is full .1 waiting"):
        _submit(engine, [1, 2, 3], [], 5)
    with pytest.raises(ContextOverflowError, match="max_tokens 38 \\+ the prompt's 3 tokens exceed the context of 40"):
        engine.check([1, 2, 3], 38)
    with pytest.raises(ContextOverflowError, match="the prompt is 40 tokens"):
        engine.check(list(range(40)), None)
    assert engine.check([1, 2, 3], None) == 37
    with pytest.raises(ValueError, match="holds no row"):
        Engine(model, load_tokenizer(model.config.text), context=40, kv_cache_bytes=100)


def test_identical_requests_share_a_batch_as_two():
    # Two clients sending the same prompt and image: two requests, each with its own row and tokens.
    model = make_model(tiny_config("early"))
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=2, context=160)
    (ids, images, n), (_, same_images, _) = _requests(model, 1)[0], _requests(model, 1)[0]  # equal, not the same
    a, b = _submit(engine, ids, images, n), _submit(engine, list(ids), same_images, n)
    while engine.waiting or engine.running:
        engine._admit()
        engine._step()
    assert a.tokens == b.tokens == _alone(model, ids, images, n)


def test_one_off_torch_work_runs_on_a_thread_that_exits():
    from omnifuse.serving.engine import on_fresh_thread

    before = threading.active_count()
    names = []
    assert on_fresh_thread(lambda x: names.append(threading.current_thread().name) or x + 1, 41) == 42
    assert names == ["omnifuse-setup"] and threading.active_count() == before
    with pytest.raises(ContextOverflowError, match="too long"):
        on_fresh_thread(lambda: (_ for _ in ()).throw(ContextOverflowError("too long")))


def test_work_handed_to_the_engine_runs_on_its_thread_and_stops_with_it():
    from omnifuse.serving.engine import EngineStopped

    model = make_model(tiny_config("early"))
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=2, context=64)
    assert engine.call(lambda: threading.current_thread().name).result() == threading.current_thread().name
    engine.start()
    try:
        assert engine.call(lambda: threading.current_thread().name).result(timeout=10) == "omnifuse-engine"
        with pytest.raises(ValueError, match="bad media"):  # the caller gets the job's exception
            engine.call(lambda: (_ for _ in ()).throw(ValueError("bad media"))).result(timeout=10)
        release = threading.Event()
        blocker = engine.call(release.wait, 10)
        while not blocker.running():  # the engine thread is in it
            time.sleep(0.01)
        pending = engine.call(lambda: "never")
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        while not engine._stopping:
            time.sleep(0.01)
        release.set()
        stopper.join(timeout=30)
        assert blocker.result(timeout=10) is True
        with pytest.raises(EngineStopped, match="shutting down"):
            pending.result(timeout=10)
    finally:
        engine.stop()


def test_a_steps_events_are_delivered_together():
    model = make_model(tiny_config("early"))
    batches = []
    engine = Engine(model, load_tokenizer(model.config.text), max_batch=3, context=64, deliver=batches.append)
    requests = [_submit(engine, [5 + i, 6, 7], [], 4) for i in range(3)]
    engine._admit()
    engine._flush()
    assert [len(b) for b in batches] == [1, 1, 1]  # each prefill's first token at once, alone
    batches.clear()
    engine._step()
    engine._flush()
    assert len(batches) == 1 and {id(r) for r, _ in batches[0]} == {id(r) for r in requests}
