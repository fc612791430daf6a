"""Pipeline: prompts with placeholders, stop tokens in the output, batch equals single."""

from __future__ import annotations

import pytest
from conftest import scene

from omnifuse.fusion import FeatureCountError
from omnifuse.pipeline import Pipeline


def test_stop_token_is_reported_in_tokens_but_not_in_text():
    pipe = Pipeline.from_preset("tiny-early", seed=0)
    free = pipe.generate("hello there", sampling=pipe.sampling(max_new_tokens=12, stop_token_ids=()))
    assert free.finish_reason == "length" and len(free.tokens) == 12
    stop = free.tokens[5]
    first = free.tokens.index(stop)
    out = pipe.generate("hello there", sampling=pipe.sampling(max_new_tokens=12, stop_token_ids=(stop,)))
    assert out.tokens == free.tokens[:first + 1]
    assert out.finish_reason == "stop"
    assert out.text == pipe.tokenizer.decode(free.tokens[:first])


@pytest.mark.parametrize("preset", ["tiny-early", "tiny-cross"])
def test_generate_batch_equals_single_calls(preset):
    pipe = Pipeline.from_preset(preset, seed=0)
    prompts = ["<image> what is left", "no image in this one, a longer prompt", "<image><image> two"]
    images = [[scene(60, 40, 1)], [], [scene(30, 30, 2), scene(80, 20, 3)]]
    sampling = pipe.sampling(max_new_tokens=10)
    batch = pipe.generate_batch(prompts, images, sampling)
    for prompt, imgs, got in zip(prompts, images, batch):
        single = pipe.generate(prompt, imgs, sampling)
        assert got.tokens == single.tokens
        assert got.visual_tokens == single.visual_tokens == sum(
            pipe.processor.num_tokens(*i.size) for i in imgs)


def test_prompt_placeholders_are_added_or_checked():
    pipe = Pipeline.from_preset("tiny-cross", seed=0)
    img = pipe.process_images([scene(40, 40)])
    ids = pipe.prompt_ids("describe", img)
    assert ids.count(pipe.tokenizer.image_token_id) == 1  # prepended, one per image (cross fusion)
    with pytest.raises(FeatureCountError, match=r"the prompt has 2 image placeholders \(<image>\) but 1 image was given"):
        pipe.prompt_ids("<image> and <image>", img)
    early = Pipeline.from_preset("tiny-early", seed=0)
    img = early.process_images([scene(40, 40)])
    assert early.prompt_ids("<image> hi", img).count(early.tokenizer.image_token_id) == img[0].num_tokens
