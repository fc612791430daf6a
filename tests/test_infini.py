"""Infini-attention layers: the paper's computation written out token by token is what the layer
computes, however the sequence reaches the cache; the memory is constant in the context and
carries gradients across segments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omnifuse.config import DecoderConfig, LayerSpec, ModelConfig
from omnifuse.decoder import build_decoder
from omnifuse.nn.infini import InfiniAttention, InfiniKVCache
from omnifuse.nn.rope import apply_rope

SEGMENT = 4


def _decoder(rule="delta", seed=0, pattern=(LayerSpec(attention="infini"), LayerSpec())):
    cfg = ModelConfig(vision=None, decoder=DecoderConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
        max_position=256, layer_pattern=pattern, memory_segment=SEGMENT, memory_rule=rule))
    torch.manual_seed(seed)
    decoder = build_decoder(cfg).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(std=0.3)
    return decoder


def _reference_attention(attn: InfiniAttention, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """One row, token by token: local causal attention inside the token's segment, the memory of
    the earlier segments read with ELU + 1 features, the gated mix; the memory updated after each
    segment by the linear or delta rule."""
    t = h.shape[1]
    q0, (k0, v) = attn._queries(h)[0], (x[0] for x in attn.memory_kv(h))  # (H, T, D), (Hkv, T, D)
    group = attn.num_heads // attn.num_kv_heads
    k0, v = k0.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    q, k = apply_rope(q0[None], cos, sin)[0], apply_rope(k0[None], cos, sin)[0]
    d = q.shape[-1]
    mem, z = torch.zeros(attn.num_heads, d, d), torch.zeros(attn.num_heads, d)
    gate = torch.sigmoid(attn.memory_gate)[:, None]
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    out = []
    for s0 in range(0, t, SEGMENT):
        seg = range(s0, min(s0 + SEGMENT, t))
        for i in seg:
            scores = (q[:, i:i + 1] @ k[:, s0:i + 1].transpose(-1, -2)) / math.sqrt(d)  # (H, 1, n)
            local = (scores.softmax(-1) @ v[:, s0:i + 1])[:, 0]
            sq = phi(q0[:, i])  # (H, D)
            retrieved = (sq[:, None] @ mem)[:, 0] / (sq * z).sum(-1, keepdim=True).clamp(min=1e-6)
            out.append(gate * retrieved + (1 - gate) * local)
        sk, vs = phi(k0[:, s0:seg.stop]), v[:, s0:seg.stop]
        if attn.rule == "delta":
            vs = vs - (sk @ mem) / (sk * z[:, None]).sum(-1, keepdim=True).clamp(min=1e-6)
        mem, z = mem + sk.transpose(-1, -2) @ vs, z + sk.sum(1)
    return attn.o_proj(torch.stack(out, 1).transpose(0, 1).reshape(1, t, -1))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_the_layer_computes_the_paper_token_by_token(rule):
    decoder = _decoder(rule)
    ids = torch.randint(0, 64, (1, 15), generator=torch.Generator().manual_seed(1))
    layer = decoder.layers[0]
    with torch.no_grad():
        x = decoder.embed_tokens(ids)
        h = layer.input_layernorm(x)
        cos, sin = decoder.rope(torch.arange(15)[None], x.dtype)
        expected = _reference_attention(layer.self_attn, h, cos, sin)
        from omnifuse.nn.masks import self_attention_mask

        got = layer.self_attn(h, rope=(cos, sin), causal=True, slots=self_attention_mask(torch.ones(1, 15)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("chunks", [(1,) * 19, (3, 1, 7, 2, 6), (4, 4, 4, 4, 3), (10, 9)])
def test_any_split_through_the_cache_equals_the_whole_forward(rule, chunks):
    decoder = _decoder(rule, seed=2)
    ids = torch.randint(0, 64, (1, sum(chunks)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = decoder(ids)
        cache = decoder.new_cache(1, 40)
        parts, at = [], 0
        for n in chunks:
            parts.append(decoder(ids[:, at:at + n], cache=cache))
            at += n
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_rows_of_a_padded_batch_and_of_a_running_batch_get_what_they_get_alone():
    decoder = _decoder(seed=4)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 64, (n,), generator=gen) for n in (13, 6)]
    ids, mask = torch.zeros(2, 13, dtype=torch.long), torch.zeros(2, 13, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 13 - len(row):], mask[r, 13 - len(row):] = row, 1
    steps = torch.randint(1, 64, (2, 7), generator=gen)
    with torch.no_grad():
        cache = decoder.new_cache(2, 24)
        batch = [decoder(ids, mask, cache=cache)[:, -1]]
        batch += [decoder(steps[:, i:i + 1], torch.ones(2, 1, dtype=torch.long), cache=cache)[:, -1] for i in range(7)]
        inserted = decoder.new_cache(2, 30)  # each prefilled alone, then inserted beside the other
        for r, row in enumerate(rows):
            own = decoder.new_cache(1, len(row))
            decoder(row[None], cache=own)
            inserted.insert(r, own)
        joined = [decoder(steps[:, i:i + 1], torch.ones(2, 1, dtype=torch.long), cache=inserted)[:, -1]
                  for i in range(7)]
        for r, row in enumerate(rows):
            alone = decoder(torch.cat((row, steps[r]))[None])[0]
            torch.testing.assert_close(torch.stack([b[r] for b in batch]), alone[len(row) - 1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.stack([b[r] for b in joined]), alone[len(row):len(row) + 7],
                                       atol=1e-5, rtol=1e-5)


def test_the_memory_is_constant_in_the_context_and_reached_by_gradients_across_segments():
    decoder = _decoder()
    small, big = decoder.new_cache(1, 16), decoder.new_cache(1, 256)
    assert isinstance(small.layers[0], InfiniKVCache) and small.layers[0].nbytes == big.layers[0].nbytes
    ids = torch.randint(0, 64, (1, 3 * SEGMENT), generator=torch.Generator().manual_seed(6))

    def reach(gate: float) -> torch.Tensor:
        """|d last logit / d each input| of a decoder of two infini layers."""
        model = _decoder(pattern=(LayerSpec(attention="infini"),))
        for layer in model.layers:
            layer.self_attn.memory_gate.data.fill_(gate)
        model.train()
        x = model.embed_tokens(ids).detach().requires_grad_()
        model(inputs_embeds=x)[0, -1].sum().backward()
        return x.grad[0].abs().sum(-1)

    open_, shut = reach(0.0), reach(-1e4)
    assert bool((open_[:2 * SEGMENT] > 0).all())  # earlier segments reach the last through the memory
    assert float(shut[:2 * SEGMENT].sum()) == 0.0 and bool((shut[2 * SEGMENT:] > 0).all())  # local attention alone


def test_the_rule_and_segment_are_checked_by_name():
    from omnifuse.config import ConfigError

    with pytest.raises(ConfigError, match="infini attention layers: decoder.memory_segment must be positive"):
        DecoderConfig(layer_pattern=(LayerSpec(attention="infini"),))
    with pytest.raises(ConfigError, match="decoder.memory_rule must be linear or delta"):
        DecoderConfig(memory_rule="hebbian")
