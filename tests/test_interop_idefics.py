"""IDEFICS (v1) checkpoints saved by transformers load in omnifuse and give the reference's prompt
ids, logits and greedy tokens.

The reference inputs come from transformers' own IdeficsProcessor with the PIL image processor
(IdeficsImageProcessorPil; the torchvision one cannot load here), as saved in the checkpoint
folder. The processor takes a list of texts and images; the omnifuse prompt is the same list
written as one string with an ``<image>`` where each image goes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import scene
from hf_fixtures import edit_config, generate_json, save_idefics
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from omnifuse.checkpoint import CheckpointError
from omnifuse.pipeline import Pipeline


def _reference(folder):
    return (transformers.IdeficsForVisionText2Text.from_pretrained(folder, dtype=torch.float32).eval(),
            transformers.IdeficsProcessor.from_pretrained(folder))


def _as_prompt(items) -> str:
    return "".join(item if isinstance(item, str) else "<image>" for item in items)


CONFIGS = [
    dict(heads=4, interval=2),
    dict(heads=2, interval=1, qk_norms=True, seed=1, latents=6, perceiver_depth=1),
    dict(heads=4, interval=4, layers=4, seed=2, image_size=56, patch=14, additional=3, latents=3),
]
S = [scene(40, 30, 1), scene(20, 50, 2), scene(60, 44, 3)]
# Text before the first image (which reads no image), images next to each other (one shared
# <fake_token_around_image>), later text that reads only the latest image, spaces the processor strips.
ITEMS = [
    ["User:", S[0], "describe the picture\nAssistant:"],
    ["the red circle is", S[0], S[1], "how many square ? ", S[2], " what colour\nAssistant:"],
    [S[1], "describe"],
    ["User: count the square", S[2], "\nAssistant: two\nUser:", S[0], "and here\nAssistant:"],
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"h{c['heads']}-every{c['interval']}-qk{c.get('qk_norms', False)}")
def test_prompt_ids_and_logits_match_reference(tmp_path, cfg):
    folder = save_idefics(tmp_path, **cfg)
    ref, processor = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    for items in ITEMS:
        images = [x for x in items if not isinstance(x, str)]
        inputs = processor(text=items, return_tensors="pt")
        ids, media = pipe.prompt_and_media(_as_prompt(items), {"image": pipe.process_images(images)})
        assert ids == inputs["input_ids"][0].tolist(), items
        torch.testing.assert_close(torch.cat([m.pixel_values for m in media]), inputs["pixel_values"][0],
                                   atol=1e-5, rtol=0)
        with torch.no_grad():
            expected = ref(**inputs).logits
            got = pipe.model(torch.tensor([ids]), images=[media])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=str(items))


def test_the_images_change_the_answer_only_where_the_reference_lets_them(tmp_path):
    # Tokens before any image read none (their cross-attention adds nothing, whatever the images);
    # each later token reads only the latest image at or before it.
    from omnifuse.nn.masks import visible_images

    pipe = Pipeline.from_checkpoint(save_idefics(tmp_path, seed=3))
    prompt = "the red circle is<image>what colour<image>describe"
    outputs = []
    for pair in ([S[0], S[1]], [S[2], S[1]]):
        ids, media = pipe.prompt_and_media(prompt, {"image": pipe.process_images(pair)})
        with torch.no_grad():
            outputs.append(pipe.model(torch.tensor([ids]), images=[media])[0])
    placeholders = torch.tensor([[i == 301 for i in ids]])
    first, second = placeholders[0].nonzero().flatten().tolist()
    diff = (outputs[0] - outputs[1]).abs().amax(-1)
    assert diff[:first].max() == 0 and diff[first:second].min() > 1e-3
    seen = visible_images(placeholders, 2, "latest_image")[0]
    assert not seen[:first].any()
    assert seen[first:second].tolist() == [[True, False]] * (second - first)
    assert seen[second:].tolist() == [[False, True]] * (len(ids) - second)


def test_left_padded_batch_matches_reference_generate(tmp_path):
    folder = save_idefics(tmp_path, seed=4)
    ref, processor = _reference(folder)
    processor.tokenizer.padding_side = "left"
    pipe = Pipeline.from_checkpoint(folder)
    batch = [ITEMS[0], ITEMS[1], ["what colour", S[2], "is the square ?"]]
    inputs = processor(text=batch, return_tensors="pt")
    assert inputs["attention_mask"].min() == 0  # padded
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = out[:, inputs["input_ids"].shape[1]:].tolist()
    got = pipe.generate_batch([_as_prompt(items) for items in batch],
                              [[x for x in items if not isinstance(x, str)] for items in batch],
                              pipe.sampling(max_new_tokens=16))
    assert [r.tokens for r in got] == expected


def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys):
    folder = save_idefics(tmp_path / "ckpt", seed=5, interval=1, qk_norms=True)
    ref, processor = _reference(folder)
    image = scene(64, 48, 6)
    image.save(tmp_path / "a.png")
    prompt = "User:<image>describe the picture\nAssistant:"
    inputs = processor(text=["User:", image, "describe the picture\nAssistant:"], return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    result = generate_json(capsys, "--checkpoint", folder, "--image", tmp_path / "a.png", "--prompt", prompt,
                           "--max-new-tokens", 32)
    assert result["tokens"] == expected
    assert len(expected) >= 8  # a real sequence, not an immediate stop


@pytest.mark.parametrize("change, message", [
    ({"use_resampler": False}, "use_resampler=false"),
    ({"perceiver_config.qk_layer_norms_perceiver": True}, "qk_layer_norms_perceiver=true is not supported"),
    ({"cross_layer_interval": 3}, "not a multiple of cross_layer_interval 3"),
    ({"alpha_type": "vector"}, "alpha_type 'vector' is not supported"),
    ({"vision_config.image_size": 42}, "images become 28 x 28 but the vision tower takes 42 x 42"),
])
def test_unsupported_or_inconsistent_checkpoints_are_named(tmp_path, change, message):
    folder = save_idefics(tmp_path, seed=7)
    edit_config(folder, **change)
    with pytest.raises(CheckpointError, match=message):
        Pipeline.from_checkpoint(folder)


def test_a_missing_part_of_the_extra_vocabulary_is_named(tmp_path):
    # The LM head is two tensors in the file (the base vocabulary and the extra tokens'); the model's
    # one head needs both, row for row.
    folder = save_idefics(tmp_path, seed=8)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.additional_fc.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="decoder.lm_head.weight: of its 302 rows, 2 are in no file tensor"):
        Pipeline.from_checkpoint(folder)


def test_the_planner_prices_the_checkpoint_as_built(tmp_path):
    # The perceiver's own head size, its missing projection and biases, and cross-attention keys
    # and values read from the perceiver's width all change the parameter count.
    from omnifuse.interop import read_any_config
    from omnifuse.planner.arch import from_model_config
    from omnifuse.planner.costs import count_parameters

    config = read_any_config(save_idefics(tmp_path, seed=9, qk_norms=True))
    predicted, built = from_model_config(config).parameters(), count_parameters(config)
    assert predicted["connector"] == built["connector"]
    assert predicted["decoder"] == built["decoder"] + built["cross_attention"]
    assert predicted["total"] == pytest.approx(built["total"], rel=1e-3)  # the ViT's pre-norm left out


def test_an_image_costs_its_placeholder_and_two_markers_in_the_context(tmp_path):
    from omnifuse.planner.costs import image_cost

    pipe = Pipeline.from_checkpoint(save_idefics(tmp_path, seed=10, latents=5))
    ids, _ = pipe.prompt_and_media("<image>", {"image": pipe.process_images([S[0]])})
    cost = image_cost(pipe.model.config, 40, 30)
    assert cost.context_tokens == len(ids) - 1 == 3  # the bos aside
    assert cost.cross_attention_states_prefill == cost.cross_attention_states_decode == 5
