"""Llama 4 text checkpoints (``llama4_text``) saved by transformers give the reference's logits
and greedy tokens: chunked attention on the RoPE layers (prompts longer than the chunk), NoPE
layers with attention-temperature tuning, the weightless q/k norm, interleaved RoPE, sigmoid top-k
experts with a shared expert on every ``interleave_moe_layer_step``-th layer."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import edit_config, generate_json, save_llama4_text

transformers = pytest.importorskip("transformers")

from omnifuse.checkpoint import CheckpointError
from omnifuse.inference import left_pad
from omnifuse.inference.batching import DecodeBatch
from omnifuse.pipeline import Pipeline

SHORT = "what colour is the circle"
LONG = "how many red square are left of the blue circle and in the picture is the green one above it"

CONFIGS = [
    dict(chunk=5),
    dict(chunk=3, seed=1, heads=4, kv_heads=1, moe_step=1, experts=4, floor_scale=4),
    dict(chunk=4, seed=2, qk_norm=False, layers=6, nope_interval=3, top_k=2, floor_scale=6),
    dict(chunk=None, seed=3, moe_step=2, rope_scaling=True),
]


def _ids(c):
    return "-".join(f"{k}{v}" for k, v in c.items())


def _reference(folder):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_logits_match_the_reference_beyond_the_chunk(tmp_path, cfg):
    folder = save_llama4_text(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    specs = pipe.model.config.layer_specs
    assert [s.rope for s in specs] == [bool(v) for v in ref.config.no_rope_layers]
    assert [s.feed_forward == "moe" for s in specs] == [i in ref.config.moe_layers for i in range(len(specs))]
    for prompt in (SHORT, LONG):
        ids = torch.tensor([pipe.prompt_ids(prompt)])
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
            got = pipe.model(ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=_ids)
def test_a_left_padded_batch_gives_each_row_the_reference_logits_alone(tmp_path, cfg):
    folder = save_llama4_text(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    prompts = [pipe.prompt_ids(p) for p in (SHORT, LONG)]
    ids, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        got = pipe.model(ids, mask)
        for row, prompt in enumerate(prompts):
            expected = ref(input_ids=torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(got[row, -len(prompt):], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[2]], ids=_ids)
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, cfg):
    from transformers import AutoTokenizer

    folder = save_llama4_text(tmp_path, **cfg)
    ref = _reference(folder)
    ref_ids = AutoTokenizer.from_pretrained(folder)(LONG, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, max_new_tokens=32, do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    assert len(expected) >= 16 and len(set(expected)) > 4
    result = generate_json(capsys, "--checkpoint", folder, "--prompt", LONG, "--max-new-tokens", 32)
    assert result["tokens"] == expected
    pipe = Pipeline.from_checkpoint(folder)
    batch = pipe.generate_batch([SHORT, LONG], sampling=pipe.sampling(max_new_tokens=32))
    assert batch[1].tokens == expected
    running = DecodeBatch(pipe.model, max_rows=2, max_len=128, sampling=pipe.sampling(max_new_tokens=32))
    running.add(pipe.prompt_ids(SHORT))
    for _ in range(3):
        running.step()
    request = running.add(pipe.prompt_ids(LONG))
    while not request.done:
        running.step()
    assert request.tokens == expected


def test_the_shipped_configs_quirks_load_and_bad_layer_lists_are_named(tmp_path):
    folder = save_llama4_text(tmp_path, seed=4)
    edit_config(folder, attn_temperature_tuning=4)  # Scout's config.json writes 4 for true
    assert Pipeline.from_checkpoint(folder).model.config.decoder.attn_temperature_floor == 8192
    edit_config(folder, moe_layers=[1, 9])
    with pytest.raises(CheckpointError, match=r"moe_layers \[1, 9\] name layers outside 0..3"):
        Pipeline.from_checkpoint(folder)
    edit_config(folder, moe_layers=[1, 3], layer_types=["chunked_attention"] * 3)
    with pytest.raises(CheckpointError, match="layer_types must give chunked_attention or full_attention"):
        Pipeline.from_checkpoint(folder)


# --- llama4: images and text ---------------------------------------------------------------------
# Llama4ImageProcessor needs torchvision, which cannot be installed beside the CPU torch here. The
# reference prompt is built the way Llama4Processor builds it (its own _prompt_split_image over the
# tile canvas), and both models get omnifuse's pixels (its processor follows the reference's steps:
# best-fit canvas, bilinear resize without distortion, zero padding, bilinear global tile, bf16
# rescale and normalisation).

from conftest import scene
from hf_fixtures import LLAMA4_SPECIALS, save_llama4

MM_CONFIGS = [
    dict(chunk=5),
    dict(chunk=7, seed=1, vision_heads=4, vision_hidden=64, moe_step=1, floor_scale=50),
    dict(chunk=None, seed=2, heads=4, kv_heads=1, max_tiles=6, tile=28, vision_layers=3),
]
MM_PROMPTS = [("what colour is the circle", []),
              ("<|image|>describe the picture", [(50, 40)]),
              ("left of <|image|> and <|image|> what is", [(120, 50), (30, 100)])]


def _mm_reference(folder):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def _reference_ids(folder, prompt, processed):
    from transformers import AutoTokenizer
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    pieces = prompt.split("<|image|>")
    text = pieces[0]
    for item, piece in zip(processed, pieces[1:], strict=True):
        per_tile = item.num_tokens // item.pixel_values.shape[0]
        text += Llama4Processor._prompt_split_image(None, item.tiles, per_tile) + piece
    return AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("cfg", MM_CONFIGS, ids=_ids)
def test_image_prompts_give_the_reference_ids_and_logits(tmp_path, cfg):
    folder = save_llama4(tmp_path, **cfg)
    ref = _mm_reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    for prompt, sizes in MM_PROMPTS:
        processed = pipe.process_images([scene(w, h, k) for k, (w, h) in enumerate(sizes)])
        ids = pipe.prompt_ids(prompt, processed)
        ref_ids = _reference_ids(folder, prompt, processed)
        assert ids == ref_ids[0].tolist(), prompt
        assert ids.count(LLAMA4_SPECIALS["<|patch|>"]) == sum(p.num_tokens for p in processed)
        kwargs = {"pixel_values": torch.cat([p.pixel_values for p in processed])} if processed else {}
        with torch.no_grad():
            expected = ref(input_ids=ref_ids, **kwargs).logits
            got = pipe.model(torch.tensor([ids]), images=[processed] if processed else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_the_tile_layout_and_token_counts(tmp_path):
    """Tiles plus a global tile only for a canvas of several tiles; 144 tokens per 336 px tile at
    the published size, here (tile / 28)^2 per tile."""
    folder = save_llama4(tmp_path, max_tiles=4)
    pipe = Pipeline.from_checkpoint(folder)
    one, wide = pipe.process_images([scene(40, 40, 0), scene(110, 50, 1)])
    assert one.tiles == (1, 1) and one.pixel_values.shape[0] == 1 and one.num_tokens == 4
    assert wide.tiles == (1, 2) and wide.pixel_values.shape[0] == 3 and wide.num_tokens == 12
    assert pipe.processor.num_tokens(110, 50) == 12
    # pixels are bfloat16 values, as the reference's rescale and normalisation leave them
    assert torch.equal(wide.pixel_values, wide.pixel_values.bfloat16().float())


def test_greedy_32_tokens_with_an_image_through_the_cli(tmp_path, capsys):
    from PIL import Image

    folder = save_llama4(tmp_path / "m", seed=4, chunk=6)
    ref = _mm_reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    image = scene(120, 60, 2)
    path = tmp_path / "scene.png"
    image.save(path)
    prompt = "<|image|>how many red square are left of the blue circle"
    processed = pipe.process_images([Image.open(path)])
    ref_ids = _reference_ids(folder, prompt, processed)
    assert ref_ids.shape[1] > 6 * 4  # well past the chunk
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, pixel_values=processed[0].pixel_values, max_new_tokens=32,
                           do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    assert len(expected) >= 16 and len(set(expected)) > 4
    result = generate_json(capsys, "--checkpoint", folder, "--prompt", prompt, "--image", path, "--max-new-tokens", 32)
    assert result["tokens"] == expected
    batch = pipe.generate_batch(["what is", prompt], [[], [image]], sampling=pipe.sampling(max_new_tokens=32))
    assert batch[1].tokens == expected
