"""Idefics3 and SmolVLM checkpoints saved by transformers load in omnifuse and give the reference's
prompt ids (tile and global-image markers), logits and greedy tokens.

The Idefics3 reference prompt comes from transformers' Idefics3Processor itself. SmolVLMProcessor
cannot be built here (its video processor needs torchvision), so the SmolVLM reference prompt is
made the way it makes it: SmolVLMImageProcessorPil's rows and cols through the processor module's
own ``get_image_prompt_string``, then the folder's tokenizer.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scene
from hf_fixtures import save_idefics3

transformers = pytest.importorskip("transformers")

from omnifuse.checkpoint import CheckpointError
from omnifuse.pipeline import Pipeline

PREFIX = {"smolvlm": "SmolVLM", "idefics3": "Idefics3"}


def _reference(folder, model_type):
    cls = getattr(transformers, f"{PREFIX[model_type]}ForConditionalGeneration")
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _reference_inputs(folder, model_type, prompt, images):
    """(input_ids, pixel_values or None) as the reference processor makes them."""
    if model_type == "idefics3":
        out = transformers.Idefics3Processor.from_pretrained(folder)(text=[prompt], images=[images] if images else None,
                                                                     return_tensors="pt")
        return out["input_ids"], out.get("pixel_values")
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    if not images:
        return tok(prompt, return_tensors="pt")["input_ids"], None
    out = transformers.SmolVLMImageProcessorPil.from_pretrained(folder)(images=[images], return_tensors="pt",
                                                                        return_row_col_info=True)
    pieces = prompt.split("<image>")
    text = pieces[0]
    for k, piece in enumerate(pieces[1:]):
        text += get_image_prompt_string(out["rows"][0][k], out["cols"][0][k], seq_len, "<fake_token_around_image>",
                                        "<image>", "<global-img>") + piece
    return tok(text, return_tensors="pt")["input_ids"], out["pixel_values"]


CONFIGS = [
    dict(model_type="smolvlm", heads=4, kv_heads=2),
    dict(model_type="idefics3", heads=4, kv_heads=4, seed=1, image_size=64, patch=8, scale=4, longest_edge=192),
    dict(model_type="smolvlm", heads=2, kv_heads=1, seed=2, vision_layers=3, tie=True, scale=1),
]
PROMPTS = [("User: what colour is the circle<end_of_utterance>\nAssistant:", []),
           ("User:<image>describe the picture<end_of_utterance>\nAssistant:", [(60, 40)]),
           ("User:<image>left of<image>what is<end_of_utterance>\nAssistant:", [(20, 30), (90, 50)])]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['model_type']}-kv{c['kv_heads']}-s{c.get('scale', 2)}")
def test_prompt_ids_and_logits_match_reference(tmp_path, cfg):
    folder = save_idefics3(tmp_path, **cfg)
    ref = _reference(folder, cfg["model_type"])
    pipe = Pipeline.from_checkpoint(folder)
    for prompt, sizes in PROMPTS:
        images = [scene(w, h, k) for k, (w, h) in enumerate(sizes)]
        ref_ids, pixel_values = _reference_inputs(folder, cfg["model_type"], prompt, images)
        processed = pipe.process_images(images)
        ids = pipe.prompt_ids(prompt, processed)
        assert ids == ref_ids[0].tolist(), prompt  # markers, newlines and image runs in the reference's places
        kwargs = {"pixel_values": pixel_values} if images else {}
        with torch.no_grad():
            expected = ref(input_ids=ref_ids, **kwargs).logits
            got = pipe.model(torch.tensor([ids]), images=[processed] if images else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_tiles_reach_the_context_in_the_markers_order(tmp_path):
    # A 3 x 2 split: six tiles framed by their row/column tokens, a newline after each row, the
    # global image last; its tokens are the features of the crops in that order.
    folder = save_idefics3(tmp_path, seed=3)
    pipe = Pipeline.from_checkpoint(folder)
    item = pipe.process_images([scene(50, 80, 1)])[0]
    assert item.tiles == (3, 2) and item.pixel_values.shape[0] == 7
    tokens = transformers.AutoTokenizer.from_pretrained(folder).convert_ids_to_tokens(pipe.prompt_ids("<image>", [item]))
    runs = "".join("I" if t == "<image>" else f"[{t}]" for t in tokens).split("[<fake_token_around_image>]")
    assert runs == ["", "[<row_1_col_1>]IIII", "[<row_1_col_2>]IIII[\n]", "[<row_2_col_1>]IIII",
                    "[<row_2_col_2>]IIII[\n]", "[<row_3_col_1>]IIII", "[<row_3_col_2>]IIII[\n\n]",
                    "[<global-img>]IIII", ""]
    assert tokens.count("<image>") == item.num_tokens == 7 * 4


def test_planner_counts_the_markers_the_prompt_gets(tmp_path):
    from omnifuse.planner.costs import image_cost

    folder = save_idefics3(tmp_path, seed=8)
    pipe = Pipeline.from_checkpoint(folder)
    for w, h in [(20, 20), (50, 80), (96, 40), (200, 30), (33, 97)]:
        item = pipe.process_images([scene(w, h, 1)])[0]
        cost = image_cost(pipe.model.config, w, h)
        assert cost.visual_tokens == item.num_tokens
        assert cost.context_tokens == len(pipe.layout.item_span(item)), (w, h)


def test_left_padded_batch_matches_reference(tmp_path):
    folder = save_idefics3(tmp_path, seed=4)
    ref = _reference(folder, "smolvlm")
    pipe = Pipeline.from_checkpoint(folder)
    a, b = scene(70, 40, 3), scene(30, 30, 4)
    rows = [("User:<image>what shape<end_of_utterance>\nAssistant:", [a]),
            ("User: how many red circle are left of the square<end_of_utterance>\nAssistant:", []),
            ("User:<image>and<image>the colour<end_of_utterance>\nAssistant:", [b, a])]
    processed = [pipe.process_images(images) for _, images in rows]
    from omnifuse.inference import left_pad

    ids, mask = left_pad([pipe.prompt_ids(p, im) for (p, _), im in zip(rows, processed)], pad_id=0)
    crops = [torch.cat([i.pixel_values for i in im]) if im else torch.zeros(0, 3, 32, 32) for im in processed]
    most = max(c.shape[0] for c in crops)
    pixel_values = torch.stack([torch.cat([c, c.new_zeros(most - c.shape[0], 3, 32, 32)]) for c in crops])
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():  # the reference drops all-zero crops, its batch padding
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixel_values).logits
        got = pipe.model(ids, mask, images=processed)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["smolvlm", "idefics3"])
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, model_type):
    from omnifuse.cli import main

    folder = save_idefics3(tmp_path / "ckpt", model_type=model_type, seed=5)
    ref = _reference(folder, model_type)
    image = scene(64, 48, 6)
    image.save(tmp_path / "a.png")
    prompt = "User:<image>what is left of the square<end_of_utterance>\nAssistant:"
    ref_ids, pixel_values = _reference_inputs(folder, model_type, prompt, [image])
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, pixel_values=pixel_values, max_new_tokens=32, do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    code = main(["generate", "--checkpoint", str(folder), "--image", str(tmp_path / "a.png"), "--prompt", prompt,
                 "--max-new-tokens", "32", "--json"])
    captured = capsys.readouterr()
    assert code == 0 and "warning" not in captured.err.lower()
    assert json.loads(captured.out)["tokens"] == expected
    assert len(expected) >= 8  # a real sequence, not an immediate stop


def test_chat_prompt_renders_as_the_reference_processor_does(tmp_path):
    # The checkpoint's template reads content as typed parts: a plain prompt becomes those parts.
    folder = save_idefics3(tmp_path, model_type="idefics3", seed=6)
    pipe = Pipeline.from_checkpoint(folder)
    processor = transformers.Idefics3Processor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = scene(40, 40, 2)
    ref_ids = processor(text=[rendered], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    assert pipe.prompt_ids("what colour", pipe.process_images([image]), chat=True) == ref_ids


def test_unsupported_processor_settings_and_mismatched_seq_len_are_named(tmp_path):
    folder = save_idefics3(tmp_path, model_type="idefics3", seed=7)
    saved = json.loads((folder / "processor_config.json").read_text())
    bad = {**saved, "image_processor": {**saved["image_processor"], "do_image_splitting": False}}
    (folder / "processor_config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="do_image_splitting=false"):
        Pipeline.from_checkpoint(folder)
    (folder / "processor_config.json").write_text(json.dumps({**saved, "image_seq_len": 9}))
    with pytest.raises(CheckpointError, match="image_seq_len 9 but the model makes 4 tokens per crop"):
        Pipeline.from_checkpoint(folder)
    bad = {**saved, "image_processor": {**saved["image_processor"], "max_image_size": {"longest_edge": 48}}}
    (folder / "processor_config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="tiles are 48 px but the vision tower takes 32 x 32"):
        Pipeline.from_checkpoint(folder)
