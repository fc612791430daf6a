"""Generation: cached decoding equals recompute, batched equals one-by-one, sampling controls."""

from __future__ import annotations

import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.inference import ContextOverflowError, SamplingConfig, generate, generate_stream, sample_next


def _prompt(model, n_text: int, images, seed: int) -> list[int]:
    """Text, then each image's placeholder span (early: num_tokens slots; cross: one), then text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n_text,), generator=g).tolist()
    for img in images:
        ids += [PLACEHOLDER] * model.fusion.placeholder_tokens(img.num_tokens)
        ids += torch.randint(0, 256, (3,), generator=g).tolist()
    return ids


@pytest.mark.parametrize("fusion,num_kv_heads", [("early", 2), ("early", 4), ("cross", 1), ("cross", 2)])
def test_cached_decoding_matches_full_recompute(fusion, num_kv_heads):
    model = make_model(tiny_config(fusion, num_kv_heads=num_kv_heads), gates=0.5)
    imgs = [model.image_processor(scene(40, 56, 1)), model.image_processor(scene(70, 30, 2))]
    prompt = _prompt(model, 5, imgs, 0)
    cache = model.new_cache(1, len(prompt) + 8)
    ids = torch.tensor([prompt])
    steps = []
    with torch.no_grad():
        logits = model(ids, images=[imgs], cache=cache)[:, -1]
        for _ in range(8):
            tok = logits.argmax(-1)
            steps.append(logits)
            ids = torch.cat([ids, tok[:, None]], 1)
            logits = model(tok[:, None], cache=cache)[:, -1]
        full = model(ids, images=[imgs])
    for i, step_logits in enumerate(steps):
        torch.testing.assert_close(step_logits, full[:, len(prompt) - 1 + i], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, full[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_batched_left_padded_greedy_equals_one_by_one(fusion):
    model = make_model(tiny_config(fusion), gates=0.5)
    proc = model.image_processor
    rows_images = [[proc(scene(40, 40, 1))], [], [proc(scene(90, 20, 2)), proc(scene(20, 90, 3))], []]
    prompts = [_prompt(model, n, imgs, s) for n, imgs, s in zip((3, 17, 6, 2), rows_images, range(4))]
    assert len({len(p) for p in prompts}) == 4  # different lengths: real left padding
    cfg = SamplingConfig(max_new_tokens=24)
    batched = generate(model, prompts, rows_images, cfg, pad_id=256)
    single = [generate(model, [p], [imgs] if imgs else None, cfg, pad_id=256)[0]
              for p, imgs in zip(prompts, rows_images)]
    assert batched == single
    assert all(len(t) == 24 for t in batched)


def test_stop_tokens_end_rows_independently():
    model = make_model(tiny_config("early"))
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    free = generate(model, prompts, cfg=SamplingConfig(max_new_tokens=12))
    stop = free[0][4]  # row 0 would produce this token at step 5
    first_stop_row1 = free[1].index(stop) if stop in free[1] else None
    out = generate(model, prompts, cfg=SamplingConfig(max_new_tokens=12, stop_token_ids=(stop,)))
    assert out[0] == free[0][:free[0].index(stop)]
    expect1 = free[1] if first_stop_row1 is None else free[1][:first_stop_row1]
    assert out[1] == expect1


def test_streaming_yields_each_token_as_it_is_made():
    model = make_model(tiny_config("early"))
    seen = []
    for step in generate_stream(model, [[5, 6, 7]], cfg=SamplingConfig(max_new_tokens=6)):
        seen.append(int(step.tokens[0]))
        assert step.tokens.shape == (1,)
    assert seen == generate(model, [[5, 6, 7]], cfg=SamplingConfig(max_new_tokens=6))[0]


def test_sampling_is_deterministic_with_a_seed_and_controls_apply():
    model = make_model(tiny_config("early"))
    p = [[10, 20, 30]]
    a = generate(model, p, cfg=SamplingConfig(max_new_tokens=16, temperature=1.5, seed=7))
    b = generate(model, p, cfg=SamplingConfig(max_new_tokens=16, temperature=1.5, seed=7))
    assert a == b
    others = [generate(model, p, cfg=SamplingConfig(max_new_tokens=16, temperature=1.5, seed=s)) for s in (1, 2, 3)]
    assert any(o != a for o in others)
    greedy = generate(model, p, cfg=SamplingConfig(max_new_tokens=16))
    assert generate(model, p, cfg=SamplingConfig(max_new_tokens=16, temperature=2.0, top_k=1, seed=3)) == greedy
    assert generate(model, p, cfg=SamplingConfig(max_new_tokens=16, temperature=2.0, top_p=1e-6, seed=3)) == greedy


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert picks == {0, 1}
    # softmax([3,2,1,0,-1]) = [.64, .23, .09, .03, .01]: top_p 0.8 keeps the first two only.
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), g)) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("temperature, top_p", [(1.0, 5e-324), (5e-324, 1.0), (1e-30, 1e-300)])
def test_extreme_but_valid_settings_sample_the_top_token(temperature, top_p):
    # A top_p that rounds to 0 in float32, or a temperature so small that logits / t overflow,
    # still leave the most likely token (a server receives such values from fuzzers and clients).
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 5.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingConfig(temperature=temperature, top_p=top_p), g).tolist() == [0, 1]


def test_context_overflow_is_an_error_and_new_tokens_are_capped():
    model = make_model(tiny_config("early"))  # max_position 512
    with pytest.raises(ContextOverflowError, match="600.*512"):
        generate(model, [[1] * 600])
    out = generate(model, [[1] * 500], cfg=SamplingConfig(max_new_tokens=50))
    assert len(out[0]) == 12


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=-1)])
def test_invalid_sampling_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)
