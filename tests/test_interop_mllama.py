"""Llama 3.2 Vision (Mllama) checkpoints saved by transformers give the reference's logits and tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import scene
from hf_fixtures import save_mllama

transformers = pytest.importorskip("transformers")

from omnifuse.inference import left_pad
from omnifuse.pipeline import Pipeline


def _reference(folder):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def _processor(folder, max_tiles):
    from transformers import AutoTokenizer, MllamaProcessor

    try:
        from transformers import MllamaImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import MllamaImageProcessor as ImageProcessor
    tok = AutoTokenizer.from_pretrained(folder)
    return MllamaProcessor(image_processor=ImageProcessor.from_pretrained(folder), tokenizer=tok)


CONFIGS = [
    dict(heads=4, kv_heads=2, max_tiles=4),
    dict(heads=4, kv_heads=1, max_tiles=2, intermediate=(1,), seed=1, cross_layers=(0, 2)),
    dict(heads=4, kv_heads=4, max_tiles=1, seed=2, rope_scaling=True, text_layers=5, cross_layers=(2,)),
    dict(heads=2, kv_heads=2, max_tiles=4, image_size=42, seed=3, global_layers=2),
]
PROMPTS = [
    ("what colour is the circle", []),
    ("<|image|>describe the picture", [(60, 30)]),
    ("what is <|image|> left of the square", [(25, 80)]),
    ("<|image|><|image|>how many circle", [(40, 40), (90, 20)]),
    ("the <|image|> one and <|image|> two", [(40, 40), (30, 70)]),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"kv{c['kv_heads']}-tiles{c['max_tiles']}-s{c.get('seed', 0)}")
def test_logits_match_reference(tmp_path, cfg):
    folder = save_mllama(tmp_path, **cfg)
    ref, proc = _reference(folder), _processor(folder, cfg["max_tiles"])
    pipe = Pipeline.from_checkpoint(folder)
    for prompt, sizes in PROMPTS:
        images = [scene(w, h, i) for i, (w, h) in enumerate(sizes)]
        inputs = proc(text=prompt, images=[images] if images else None, return_tensors="pt")
        ours = pipe.prompt_ids(prompt, pipe.process_images(images))
        assert inputs["input_ids"][0].tolist() == ours, prompt
        with torch.no_grad():
            expected = ref(**inputs).logits
            got = pipe.model(torch.tensor([ours]), images=[pipe.process_images(images)] if images else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_left_padded_batch_matches_reference(tmp_path):
    folder = save_mllama(tmp_path, seed=4)
    ref, proc = _reference(folder), _processor(folder, 4)
    proc.tokenizer.padding_side = "left"
    proc.tokenizer.pad_token = "<|finetune_right_pad_id|>"
    pipe = Pipeline.from_checkpoint(folder)
    prompts = ["<|image|>what shape", "how many red circle are left of the <|image|> square"]
    images = [[scene(50, 50, 1)], [scene(80, 30, 2)]]
    inputs = proc(text=prompts, images=images, padding=True, return_tensors="pt")
    rows = [pipe.prompt_ids(p, pipe.process_images(i)) for p, i in zip(prompts, images)]
    ids, mask = left_pad(rows, pad_id=0)
    assert torch.equal(ids[mask.bool()], inputs["input_ids"][inputs["attention_mask"].bool()])
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(**inputs, position_ids=position_ids).logits
        got = pipe.model(ids, mask, images=[pipe.process_images(i) for i in images])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt,sizes", [("<|image|>describe the picture", [(70, 40)]),
                                          ("what <|image|> and <|image|> is", [(40, 40), (20, 90)])])
def test_greedy_32_tokens_identical_to_reference_generate(tmp_path, prompt, sizes):
    folder = save_mllama(tmp_path, seed=5)
    ref, proc = _reference(folder), _processor(folder, 4)
    pipe = Pipeline.from_checkpoint(folder)
    images = [scene(w, h, i + 7) for i, (w, h) in enumerate(sizes)]
    inputs = proc(text=prompt, images=[images], return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    ours = pipe.generate(prompt, images, pipe.sampling(max_new_tokens=32))
    assert ours.tokens == expected
    assert len(expected) >= 8


def test_decode_cost_does_not_grow_with_images(tmp_path):
    folder = save_mllama(tmp_path, seed=6)
    pipe = Pipeline.from_checkpoint(folder)
    one = pipe.generate("<|image|>what", [scene(40, 40, 1)], pipe.sampling(max_new_tokens=4))
    four = pipe.generate("<|image|>" * 4 + "what", [scene(40, 40, i) for i in range(4)], pipe.sampling(max_new_tokens=4))
    # Four images take four context positions, not four images' worth of visual tokens.
    assert four.prompt_tokens - one.prompt_tokens == 3
    assert four.visual_tokens == 4 * one.visual_tokens


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_saved_processor_settings_reach_the_cli(tmp_path, capsys, layout):
    # mean = std = 0.5, not the CLIP values the published checkpoints use: a processor read wrongly
    # (or not at all) normalises differently and generates other tokens.
    import json

    from omnifuse.cli import main

    folder = save_mllama(tmp_path / "ckpt", seed=9, mean=(0.5,) * 3, std=(0.5,) * 3, layout=layout)
    assert (folder / "processor_config.json").is_file() == (layout == "v5")
    ref, proc = _reference(folder), _processor(folder, 4)
    image, prompt = scene(70, 40, 3), "<|image|>describe the picture"
    image.save(tmp_path / "a.png")
    inputs = proc(text=prompt, images=[[image]], return_tensors="pt")
    with torch.no_grad():
        expected = ref.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    code = main(["generate", "--checkpoint", str(folder), "--image", str(tmp_path / "a.png"), "--prompt", prompt,
                 "--max-new-tokens", "32", "--json"])
    captured = capsys.readouterr()
    assert code == 0 and "warning" not in captured.err
    assert json.loads(captured.out)["tokens"] == expected


def test_folder_without_processor_settings_says_which_defaults(tmp_path, capsys):
    from omnifuse.cli import main
    from omnifuse.config import LoudDefaultWarning

    folder = save_mllama(tmp_path, seed=10, layout="none")
    with pytest.warns(LoudDefaultWarning, match="no processor_config.json or preprocessor_config.json.*mean"):
        pipe = Pipeline.from_checkpoint(folder)
    assert pipe.model.config.image.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "what", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "omnifuse: warning:" in err and "published Llama 3.2 Vision settings" in err


def test_processor_that_does_not_fit_the_encoder_is_refused(tmp_path):
    import json

    from omnifuse.checkpoint import CheckpointError

    folder = save_mllama(tmp_path, seed=11)
    cfg = json.loads((folder / "processor_config.json").read_text())
    cfg["image_processor"]["size"] = {"height": 56, "width": 56}
    (folder / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="processor_config.json: tiles are 56 px but the vision encoder takes 28"):
        Pipeline.from_checkpoint(folder)
