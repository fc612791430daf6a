"""LLaVA-NeXT-Video checkpoints saved by transformers load in omnifuse and give the reference's
logits and tokens on videos. The reference's video processor needs torchvision, which cannot run
here (the only wheel offered is a CUDA build that fails beside the CPU torch), so the reference is
fed the same frames prepared as that processor prepares them: CLIP's resize of the shortest edge,
centre crop and normalisation, per frame, through ``CLIPImageProcessorPil``."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from hf_fixtures import save_llava_next_video
from test_video import make_video

transformers = pytest.importorskip("transformers")

from omnifuse.cli import main
from omnifuse.errors import FeatureCountError
from omnifuse.pipeline import Pipeline


def reference(folder):
    from transformers import LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def reference_pixels(path, fps, size):
    """The frames omnifuse takes from ``path``, prepared as the reference's video processor prepares frames."""
    from transformers import CLIPImageProcessorPil

    from omnifuse.processing.video import load_video

    clip = load_video(path, fps=fps)
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(list(clip.frames), return_tensors="pt")["pixel_values"][None]  # (1, frames, 3, S, S)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    out = {}
    for name, n, size in (("a", 25, (80, 60)), ("b", 14, (50, 70))):
        path = folder / f"{name}.mp4"
        make_video(path, [Fraction(i, 10) for i in range(n)], time_base=Fraction(1, 10), rate=Fraction(10), size=size)
        out[name] = path
    return out


def process(pipe, path, fps):
    (item,) = pipe.process("video", [path], fps=fps)
    return item


CONFIGS = [dict(heads=4, kv_heads=2, feature_layer=-2, strategy="default"),
           dict(heads=4, kv_heads=4, feature_layer=-1, strategy="default", seed=1, image_size=56),
           dict(heads=2, kv_heads=1, feature_layer=[-3, -1], strategy="default", seed=2)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"h{c['heads']}kv{c['kv_heads']}-fl{c['feature_layer']}")
def test_logits_match_reference(tmp_path, videos, cfg):
    folder = save_llava_next_video(tmp_path, **cfg)
    ref = reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    size = cfg.get("image_size", 42)
    item = process(pipe, videos["a"], 2.0)
    assert item.num_tokens == 5 * (size // 7 // 2) ** 2  # 2.5 s at 2 fps: 5 frames of pooled patches
    for prompt, media in (("what moves", []), ("<video> which way does it move", [item])):
        ids, items = pipe.prompt_and_media(prompt, {"video": media})
        kwargs = {"pixel_values_videos": reference_pixels(videos["a"], 2.0, size)} if media else {}
        with torch.no_grad():
            expected = ref(input_ids=torch.tensor([ids]), **kwargs).logits
            got = pipe.model(torch.tensor([ids]), images=[items] if items else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_left_padded_batch_matches_reference(tmp_path, videos):
    folder = save_llava_next_video(tmp_path, seed=4)
    ref = reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    item = process(pipe, videos["b"], 1.0)
    rows = [pipe.prompt_and_media("<video> what", {"video": [item]})[0], pipe.prompt_ids("is the circle left of it", [])]
    from omnifuse.inference import left_pad

    ids, mask = left_pad(rows, pad_id=0)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       pixel_values_videos=reference_pixels(videos["b"], 1.0, 42)).logits
        got = pipe.model(ids, mask, images=[[item], []])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, videos):
    folder = save_llava_next_video(tmp_path / "ckpt", seed=5)
    ref = reference(folder)
    prompt = "<video> which way does it move"
    assert main(["generate", "--checkpoint", str(folder), "--video", str(videos["a"]), "--fps", "2", "--prompt", prompt,
                 "--max-new-tokens", "32", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    video = ours["videos"][0]
    assert video["frames"] == 5 and video["tokens"] == 45
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(prompt.replace("<video>", "<video>" * 45), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values_videos=reference_pixels(videos["a"], 2.0, 42), max_new_tokens=32,
                           do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    assert ours["tokens"] == expected and len(expected) >= 8


def test_images_are_refused_by_name(tmp_path, videos):
    folder = save_llava_next_video(tmp_path)
    pipe = Pipeline.from_checkpoint(folder)
    assert pipe.model.config.modalities == ("video",)
    with pytest.raises(FeatureCountError, match="takes video input, not image"):
        pipe.process("image", [videos["a"]])
