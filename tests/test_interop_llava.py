"""LLaVA checkpoints saved by transformers load in omnifuse and give the reference's logits and tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scene
from hf_fixtures import save_llava

transformers = pytest.importorskip("transformers")

from omnifuse.checkpoint import CheckpointError
from omnifuse.pipeline import Pipeline


def _reference(folder):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(pipe, prompt, images):
    return torch.tensor([pipe.prompt_ids(prompt, images)])


CONFIGS = [
    dict(heads=4, kv_heads=2, feature_layer=-2, strategy="default"),
    dict(heads=4, kv_heads=4, feature_layer=-1, strategy="full", seed=1),
    dict(heads=4, kv_heads=1, feature_layer=[-3, -1], strategy="default", seed=2, vision_layers=4),
    # (feature layer 0, the embeddings, is valid here but transformers 5.24 mis-reads 0 as "no hidden states")
    dict(heads=2, kv_heads=2, feature_layer=1, strategy="default", seed=3, tie=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"h{c['heads']}kv{c['kv_heads']}-fl{c['feature_layer']}-{c['strategy']}")
def test_logits_match_reference(tmp_path, cfg):
    folder = save_llava(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    img1, img2 = pipe.process_images([scene(60, 40, 1), scene(30, 70, 2)])
    cases = [("what colour is the circle", []), ("<image> describe the picture", [img1]),
             ("<image> left of <image> what is", [img1, img2])]
    for prompt, imgs in cases:
        ids = _ids(pipe, prompt, imgs)
        kwargs = {"pixel_values": torch.cat([i.pixel_values for i in imgs])} if imgs else {}
        with torch.no_grad():
            expected = ref(input_ids=ids, **kwargs).logits
            got = pipe.model(ids, images=[imgs] if imgs else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_left_padded_batch_matches_reference(tmp_path):
    folder = save_llava(tmp_path, seed=4)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    img = pipe.process_images([scene(50, 50, 3)])[0]
    rows = [pipe.prompt_ids("<image> what shape", [img]), pipe.prompt_ids("how many red circle are left of the square", [])]
    from omnifuse.inference import left_pad

    ids, mask = left_pad(rows, pad_id=0)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=img.pixel_values).logits
        got = pipe.model(ids, mask, images=[[img], []])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("processor", ["crop", "pad"])
def test_greedy_32_tokens_identical_to_reference_generate(tmp_path, processor):
    folder = save_llava(tmp_path, seed=5, processor=processor)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    from transformers import AutoTokenizer

    try:
        from transformers import CLIPImageProcessorPil as RefImageProcessor
    except ImportError:  # transformers 4.x: the PIL processor is the default one
        from transformers import CLIPImageProcessor as RefImageProcessor
    tok = AutoTokenizer.from_pretrained(folder)
    image = scene(64, 48, 6)
    prompt = "<image> what is left of the square"
    if processor == "pad":
        from transformers import LlavaImageProcessorPil

        pixel_values = LlavaImageProcessorPil.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
    else:
        pixel_values = RefImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
    n = pipe.model.image_processor.num_tokens(64, 48)
    ref_ids = tok(prompt.replace("<image>", "<image>" * n), return_tensors="pt")["input_ids"]
    ours = pipe.generate(prompt, [image], pipe.sampling(max_new_tokens=32))
    assert ref_ids[0].tolist() == pipe.prompt_ids(prompt, pipe.process_images([image]))
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, pixel_values=pixel_values, max_new_tokens=32, do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    assert ours.tokens == expected
    assert len(expected) >= 8  # a real sequence, not an immediate stop


def test_both_key_layouts_load(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_llava(tmp_path, seed=6)
    before = Pipeline.from_checkpoint(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():  # transformers >= 4.52 layout
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.") if k.startswith("vision_tower.") else k
        k = "model." + k if k.startswith("multi_modal_projector.") else k
        renamed[k] = v
    assert any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, str(folder / "model.safetensors"))
    after = Pipeline.from_checkpoint(folder)
    for (k, a), b in zip(before.model.state_dict().items(), after.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_sharded_checkpoint_loads_and_missing_shard_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_llava(tmp_path, seed=7)
    whole = Pipeline.from_checkpoint(folder).model.state_dict()
    tensors = load_file(str(folder / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(folder / name))
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = Pipeline.from_checkpoint(folder).model.state_dict()
    assert all(torch.equal(whole[k], sharded[k]) for k in whole)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Pipeline.from_checkpoint(folder)


def test_missing_key_and_unsupported_architecture_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_llava(tmp_path, seed=8)
    tensors = load_file(str(folder / "model.safetensors"))
    victim = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight"))
    del tensors[victim]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.1\.mlp\.up_proj\.weight"):
        Pipeline.from_checkpoint(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="qwen2_vl.*supported: .*llava"):
        Pipeline.from_checkpoint(folder)


@pytest.mark.parametrize("layout,processor", [("v5", "pad"), ("v5", "crop"), ("v4", "pad")])
def test_saved_processor_settings_reach_the_cli(tmp_path, capsys, layout, processor):
    # mean = std = 0.5 (and the pad colour it implies), not the CLIP defaults a misread folder gets.
    from omnifuse.cli import main

    folder = save_llava(tmp_path / "ckpt", seed=9, processor=processor, mean=(0.5,) * 3, std=(0.5,) * 3, layout=layout)
    ref = _reference(folder)
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaImageProcessorPil

    image_processor = (LlavaImageProcessorPil if processor == "pad" else CLIPImageProcessorPil).from_pretrained(folder)
    assert list(image_processor.image_mean) == [0.5, 0.5, 0.5]  # the reference reads the saved settings
    image, prompt = scene(64, 40, 3), "<image> what is left of the square"
    image.save(tmp_path / "a.png")
    pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
    n = (28 // 14) ** 2
    ref_ids = AutoTokenizer.from_pretrained(folder)(prompt.replace("<image>", "<image>" * n), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, pixel_values=pixel_values, max_new_tokens=32, do_sample=False)
    code = main(["generate", "--checkpoint", str(folder), "--image", str(tmp_path / "a.png"), "--prompt", prompt,
                 "--max-new-tokens", "32", "--json"])
    captured = capsys.readouterr()
    assert code == 0 and "warning" not in captured.err
    assert json.loads(captured.out)["tokens"] == out[0, ref_ids.shape[1]:].tolist()


def test_folder_without_processor_settings_says_which_defaults(tmp_path):
    from omnifuse.config import LoudDefaultWarning

    folder = save_llava(tmp_path, seed=10, layout="none")
    with pytest.warns(LoudDefaultWarning, match="no processor_config.json or preprocessor_config.json.*CLIP"):
        Pipeline.from_checkpoint(folder)
