"""BLIP-2 and InstructBLIP checkpoints (Llama language model) saved by transformers load in omnifuse
and give the reference's prompt ids, Q-Former instruction ids, logits and greedy tokens.

The reference inputs come from transformers' own Blip2Processor / InstructBlipProcessor with the
PIL image processor (BlipImageProcessorPil; the torchvision one cannot load here), as saved in the
checkpoint folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scene
from hf_fixtures import edit_config, generate_json, save_blip2
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from omnifuse.checkpoint import CheckpointError
from omnifuse.errors import RequestError, TokenizerError
from omnifuse.pipeline import Pipeline

MODELS = {"blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
          "instructblip": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor")}


def _reference(folder, model_type):
    model_cls, processor_cls = (getattr(transformers, n) for n in MODELS[model_type])
    return model_cls.from_pretrained(folder, dtype=torch.float32).eval(), processor_cls.from_pretrained(folder)


CONFIGS = [
    dict(model_type="instructblip", heads=4, kv_heads=2),
    dict(model_type="blip-2", heads=4, kv_heads=4, seed=1, queries=4, cross_every=1),
    dict(model_type="instructblip", heads=2, kv_heads=1, seed=2, image_size=56, patch=14, qformer_layers=4,
         cross_every=3, tie=True, queries=9),
]
PROMPTS = ["what is the colour of the circle", "Question: how many red square are left of the circle? Answer:",
           "describe the picture"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['model_type']}-kv{c['kv_heads']}-q{c.get('queries', 6)}")
def test_prompt_ids_and_logits_match_reference(tmp_path, cfg):
    folder = save_blip2(tmp_path, **cfg)
    ref, processor = _reference(folder, cfg["model_type"])
    pipe = Pipeline.from_checkpoint(folder)
    for k, prompt in enumerate(PROMPTS):
        image = scene(40 + 13 * k, 30 + 7 * k, k)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        ids, items = pipe.prompt_and_media(prompt, {"image": pipe.process_images([image])})
        assert ids == inputs["input_ids"][0].tolist(), prompt  # the query tokens in front of the bos
        if cfg["model_type"] == "instructblip":
            assert items[0].instruction.tolist() == inputs["qformer_input_ids"][0].tolist(), prompt
        torch.testing.assert_close(items[0].pixel_values, inputs["pixel_values"], atol=1e-5, rtol=0)
        with torch.no_grad():
            expected = ref(**inputs).logits
            got = pipe.model(torch.tensor([ids]), images=[items])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_instruct_blip_queries_read_the_instruction(tmp_path):
    # What the 32 (here 6) query outputs hold depends on the question: the model's behaviour users
    # pick InstructBLIP for, and what a loader that dropped the Q-Former's text input would lose.
    pipe = Pipeline.from_checkpoint(save_blip2(tmp_path, seed=3))
    image = pipe.process_images([scene(40, 40, 1)])
    outputs = []
    for prompt in ("what is the colour", "how many square"):
        _, items = pipe.prompt_and_media(prompt, {"image": image})
        with torch.no_grad():
            outputs.append(pipe.model.encode_media(items)[0])
    assert outputs[0].shape == (6, 64)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="without instruction ids"):  # an item built around the pipeline
        pipe.model.encode_media(image)


def test_left_padded_batch_matches_reference_generate(tmp_path):
    folder = save_blip2(tmp_path, seed=4)
    ref, processor = _reference(folder, "instructblip")
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.pad_token = "<unk>"  # the fixture's tokenizer names no pad token; any id is masked
    pipe = Pipeline.from_checkpoint(folder)
    prompts = ["what is the colour", "Question: how many red circle are left of the blue square? Answer:", "describe"]
    images = [scene(40, 30, 3), scene(20, 50, 4), scene(60, 60, 5)]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert inputs["qformer_attention_mask"].min() == 0 and inputs["attention_mask"].min() == 0  # padding on both
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = out[:, inputs["input_ids"].shape[1]:].tolist()
    got = pipe.generate_batch(prompts, [[im] for im in images], pipe.sampling(max_new_tokens=16))
    assert [r.tokens for r in got] == expected


@pytest.mark.parametrize("model_type", ["blip-2", "instructblip"])
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, model_type):
    folder = save_blip2(tmp_path / "ckpt", model_type=model_type, seed=5)
    ref, processor = _reference(folder, model_type)
    image = scene(64, 48, 6)
    image.save(tmp_path / "a.png")
    prompt = "Question: what is left of the square? Answer:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=32, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    result = generate_json(capsys, "--checkpoint", folder, "--image", tmp_path / "a.png", "--prompt", prompt,
                           "--max-new-tokens", 32)
    assert result["tokens"] == expected and result["visual_tokens"] == 6
    assert len(expected) >= 8  # a real sequence, not an immediate stop


def test_files_from_before_transformers_5_load_the_same(tmp_path):
    # transformers 4 saved the vision attention's biases as q_bias and v_bias (the key bias fixed at
    # zero); transformers 5 saves one fused qkv.bias. Both layouts are in circulation.
    folder = save_blip2(tmp_path, model_type="blip-2", seed=6)
    ref, processor = _reference(folder, "blip-2")
    tensors = load_file(folder / "model.safetensors")
    for key in [k for k in tensors if k.endswith("self_attn.qkv.bias")]:
        q, k, v = tensors.pop(key).chunk(3)
        k.zero_()
        stem = key[: -len("qkv.bias")]
        tensors[stem + "q_bias"], tensors[stem + "v_bias"] = q.clone(), v.clone()
    with torch.no_grad():  # the reference with the key bias the old layout implies
        for layer in ref.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[32:64] = 0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    pipe = Pipeline.from_checkpoint(folder)
    image = scene(30, 30, 2)
    inputs = processor(images=image, text="what colour", return_tensors="pt")
    ids, items = pipe.prompt_and_media("what colour", {"image": pipe.process_images([image])})
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(torch.tensor([ids]), images=[items]), ref(**inputs).logits,
                                   atol=1e-4, rtol=1e-4)


def test_unsupported_or_inconsistent_checkpoints_are_named(tmp_path):
    folder = save_blip2(tmp_path, seed=7)
    config, processor_config = (folder / "config.json").read_text(), (folder / "processor_config.json").read_text()
    edit_config(folder, **{"text_config.model_type": "opt"})
    with pytest.raises(CheckpointError, match="language model 'opt' is not supported"):
        Pipeline.from_checkpoint(folder)
    (folder / "config.json").write_text(config)
    edit_config(folder, image_token_index=None)
    with pytest.raises(CheckpointError, match="no image_token_index"):
        Pipeline.from_checkpoint(folder)
    (folder / "config.json").write_text(config)
    (folder / "processor_config.json").write_text(json.dumps({**json.loads(processor_config), "num_query_tokens": 32}))
    with pytest.raises(CheckpointError, match="num_query_tokens 32 but the model has 6 queries"):
        Pipeline.from_checkpoint(folder)
    (folder / "processor_config.json").write_text(processor_config)
    edit_config(folder, **{"qformer_config.num_hidden_layers": 5})
    with pytest.raises(CheckpointError, match="missing keys"):
        Pipeline.from_checkpoint(folder)
    (folder / "config.json").write_text(config)
    (folder / "qformer_tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="qformer_tokenizer/tokenizer.json"):
        Pipeline.from_checkpoint(folder)


def test_prompt_problems_are_named(tmp_path):
    pipe = Pipeline.from_checkpoint(save_blip2(tmp_path, seed=8))
    image = pipe.process_images([scene(30, 30, 1)])
    with pytest.raises(RequestError, match="at most 64"):  # the Q-Former's learned positions
        pipe.prompt_and_media("red " * 70, {"image": image})
    with pytest.raises(ValueError, match="2 image placeholders"):
        pipe.prompt_and_media("<image>a<image>b", {"image": image})
