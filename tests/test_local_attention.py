"""Bounded self-attention layer kinds (sliding window, chunked) and their ring caches: the same
outputs as an explicit mask over the whole sequence, whichever way the sequence reaches the cache
(one prefill, token by token, chunks of any size, rows at different lengths), with a cache whose
size does not grow with the context; Llama 4's temperature tuning and weightless q/k norm."""

from __future__ import annotations

import math

import pytest
import torch

from omnifuse.config import DecoderConfig, LayerSpec, ModelConfig
from omnifuse.decoder import build_decoder
from omnifuse.inference.cache import LayerKVCache, RingKVCache
from omnifuse.nn.attention import temperature_scale
from omnifuse.nn.masks import LocalSpan

WINDOW, CHUNK = 5, 4
PATTERNS = {
    "sliding": (LayerSpec(attention="sliding"), LayerSpec()),
    "chunked": (LayerSpec(attention="chunked", qk_norm=True), LayerSpec(rope=False)),
    "all-sliding": (LayerSpec(attention="sliding", feed_forward="moe"),),
}


def _config(pattern, temperature=0) -> ModelConfig:
    return ModelConfig(vision=None, decoder=DecoderConfig(
        vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48,
        max_position=128, layer_pattern=pattern, sliding_window=WINDOW, attention_chunk_size=CHUNK,
        num_experts=3, experts_per_token=2, attn_temperature_floor=temperature))


def _decoder(pattern, seed=0, temperature=0):
    cfg = _config(pattern, temperature)
    torch.manual_seed(seed)
    decoder = build_decoder(cfg).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(std=0.25)
    return decoder


def _reference_logits(decoder, ids):
    """A plain implementation: every layer attends with an explicit (T, T) mask of its span."""
    from omnifuse.nn.rope import apply_rope

    t = ids.shape[1]
    pos = torch.arange(t)[None]
    x = decoder.embed_tokens(ids)
    cos, sin = decoder.rope(pos, x.dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer in decoder.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, (k, v) = attn._queries(h), attn.memory_kv(h)
        if layer.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn.rope_qk_norm:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + attn.norm_eps)
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + attn.norm_eps)
        if attn.temperature is not None:
            floor, scale = attn.temperature
            q = q * (1 + scale * torch.log1p(torch.floor((pos[0] + 1) / floor)))[None, None, :, None]
        mask = causal
        span = attn.cache_span
        if span is not None and span.window:
            mask = mask & (pos[0][:, None] - pos[0][None, :] < span.window)
        elif span is not None:
            mask = mask & (pos[0][:, None] // span.chunk == pos[0][None, :] // span.chunk)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return decoder.lm_head(decoder.norm(x))


@pytest.mark.parametrize("name", PATTERNS)
def test_a_whole_forward_equals_an_explicit_mask_of_each_span(name):
    decoder = _decoder(PATTERNS[name])
    ids = torch.randint(0, 64, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids), _reference_logits(decoder, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("chunks", [(23,), (1,) * 23, (3, 1, 7, 2, 10), (12, 11), (4, 4, 4, 4, 4, 3)])
def test_any_split_into_chunks_through_the_ring_cache_equals_the_whole_forward(name, chunks):
    decoder = _decoder(PATTERNS[name], seed=2)
    ids = torch.randint(0, 64, (1, sum(chunks)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = decoder(ids)
        cache = decoder.new_cache(1, 40)
        parts, at = [], 0
        for n in chunks:
            parts.append(decoder(ids[:, at:at + n], cache=cache))
            at += n
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_a_left_padded_batch_equals_each_row_alone_and_decodes_on():
    decoder = _decoder(PATTERNS["chunked"], seed=4, temperature=3)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 64, (n,), generator=gen) for n in (17, 6)]
    ids = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros(2, 17, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 17 - len(row):], mask[r, 17 - len(row):] = row, 1
    with torch.no_grad():
        cache = decoder.new_cache(2, 30)
        batch = [decoder(ids, mask, cache=cache)[:, -1]]
        steps = torch.randint(1, 64, (2, 8), generator=gen)
        for i in range(8):
            batch.append(decoder(steps[:, i:i + 1], torch.ones(2, 1, dtype=torch.long), cache=cache)[:, -1])
        for r, row in enumerate(rows):
            alone = decoder(torch.cat((row, steps[r]))[None])
            expected = torch.cat((alone[:, len(row) - 1:len(row)], alone[:, len(row):]), dim=1)[0]
            torch.testing.assert_close(torch.stack([b[r] for b in batch]), expected, atol=1e-5, rtol=1e-5)


def test_rows_inserted_at_different_lengths_decode_as_they_would_alone():
    """A request prefilled alone into a short ring, inserted beside a longer row (the ring re-indexed)."""
    decoder = _decoder(PATTERNS["sliding"], seed=6)
    gen = torch.Generator().manual_seed(7)
    long, short = torch.randint(0, 64, (1, 19), generator=gen), torch.randint(0, 64, (1, 3), generator=gen)
    with torch.no_grad():
        batch = decoder.new_cache(2, 40)
        for prompt, row in ((long, 0), (short, 1)):
            own = decoder.new_cache(1, prompt.shape[1])  # rings of min(window, prompt) slots
            decoder(prompt, cache=own)
            batch.insert(row, own)
        steps = torch.randint(0, 64, (2, 9), generator=gen)
        got = torch.cat([decoder(steps[:, i:i + 1], torch.ones(2, 1, dtype=torch.long), cache=batch)
                         for i in range(9)], dim=1)
        for r, prompt in enumerate((long, short)):
            alone = decoder(torch.cat((prompt, steps[r:r + 1]), dim=1))[:, prompt.shape[1]:]
            torch.testing.assert_close(got[r:r + 1], alone, atol=1e-5, rtol=1e-5)


def test_the_cache_of_a_bounded_layer_is_its_span_whatever_the_context():
    decoder = _decoder(PATTERNS["chunked"])
    small, big = decoder.new_cache(1, 32), decoder.new_cache(1, 128)
    assert isinstance(small.layers[0], RingKVCache) and small.layers[0].capacity == CHUNK
    assert isinstance(small.layers[1], LayerKVCache) and small.layers[1].capacity == 32
    assert big.layers[0].nbytes == small.layers[0].nbytes and big.layers[1].nbytes == 4 * small.layers[1].nbytes
    assert decoder.new_cache(1, 3).layers[0].capacity == 3  # never more than the context
    assert small.bounded and not _decoder((LayerSpec(),)).new_cache(1, 8).bounded


def test_spans_and_temperature_follow_their_definitions():
    q = torch.tensor([[8]])
    keys = torch.arange(10)[None]
    assert LocalSpan(window=3).visible(q, keys).nonzero()[:, 1].tolist() == [6, 7, 8, 9]  # 9 > q is the caller's
    assert LocalSpan(chunk=4).visible(q, keys).nonzero()[:, 1].tolist() == [8, 9]  # position 8 starts a block
    scale = temperature_scale(torch.tensor([[0, 2, 3, 7, 8191]]), 4, 0.1).flatten()
    expected = [1.0, 1.0, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3), 1 + 0.1 * math.log(1 + 2048)]
    torch.testing.assert_close(scale, torch.tensor(expected))


def test_temperature_tuning_changes_only_nope_layers_beyond_the_floor():
    plain, tuned = _decoder(PATTERNS["chunked"], seed=8), _decoder(PATTERNS["chunked"], seed=8, temperature=6)
    assert plain.layers[1].self_attn.temperature is None and tuned.layers[1].self_attn.temperature == (6, 0.1)
    assert tuned.layers[0].self_attn.temperature is None  # a RoPE layer
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = plain(ids), tuned(ids)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions 0..4: scale 1
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)
    torch.testing.assert_close(b, _reference_logits(tuned, ids), atol=1e-4, rtol=1e-4)


def test_bounded_kinds_need_their_span_and_name_it():
    from omnifuse.config import ConfigError

    with pytest.raises(ConfigError, match="sliding attention layers: decoder.sliding_window must be positive"):
        DecoderConfig(layer_pattern=(LayerSpec(attention="sliding"),))
    with pytest.raises(ConfigError, match="chunked attention layers: decoder.attention_chunk_size must be positive"):
        DecoderConfig(layer_pattern=(LayerSpec(attention="chunked"),))


def test_a_bounded_model_keeps_no_prefix_and_refuses_one():
    from omnifuse.errors import RequestError
    from omnifuse.inference.batching import DecodeBatch, Prefix
    from omnifuse.model import build_model

    batch = DecodeBatch(build_model(_config(PATTERNS["sliding"])).eval(), max_rows=2, max_len=32)
    assert batch.add(list(range(1, 12)), keep=8).kept is None  # the ring no longer holds positions 0..7
    k = tuple(torch.zeros(2, 4, 8) for _ in range(4))
    with pytest.raises(RequestError, match="bounded attention layers"):
        batch.add(list(range(1, 12)), prefix=Prefix(k, k))
