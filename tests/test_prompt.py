"""Prompt layout (omnifuse.processing.prompt): one set of rules for inference and training."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import scene, tiny_config

from omnifuse.config import FusionConfig, TextConfig
from omnifuse.fusion import FeatureCountError
from omnifuse.fusion.strategy import fusion_strategy
from omnifuse.model import build_model
from omnifuse.pipeline import Pipeline
from omnifuse.processing.prompt import PromptLayout
from omnifuse.processing.text import ByteTokenizer
from omnifuse.training.collate import ExampleBuilder
from omnifuse.training.llava_data import read_llava_json
from omnifuse.training.losses import IGNORE

BOS, IMAGE = 257, 259  # ByteTokenizer's <s> and <image>
EARLY = fusion_strategy(FusionConfig())
CROSS = fusion_strategy(FusionConfig(type="cross", cross_attention_every=1))


def _config(fusion: str, bos_after_leading_images: bool = False):
    config = tiny_config(fusion)
    return dataclasses.replace(config, text=TextConfig(bos_after_leading_images=bos_after_leading_images))


def _pipeline(config) -> Pipeline:
    return Pipeline(build_model(config), ByteTokenizer(config.text))


def _builder(pipe: Pipeline, max_length: int = 4096) -> ExampleBuilder:
    return ExampleBuilder(PromptLayout.for_model(pipe.model.config, pipe.tokenizer), max_length)


# --- training builds the prompt inference builds ----------------------------------------------

PROMPTS = [("what colour?", 1), ("how many?", 2), ("<image> left of <image>?", 2), ("no image", 0),
           ("<image>describe", 1)]


@pytest.mark.parametrize("bos_rule", [False, True], ids=["llava", "bos_after_leading_images"])
@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_collated_user_turn_equals_the_pipelines_prompt(fusion, bos_rule):
    pipe = _pipeline(_config(fusion, bos_rule))
    builder = _builder(pipe)
    for text, n in PROMPTS:
        images = pipe.process_images([scene(40 + 10 * i, 30, i) for i in range(n)])
        expected = pipe.prompt_ids(text, images, chat=True)
        assert builder.prompt([("user", text)], images) == expected, text
        row = builder.build([("user", text), ("assistant", "red")], images)
        # The row starts with exactly the prompt; the loss starts where the answer does.
        assert row.input_ids[:len(expected)] == expected, text
        assert all(lab == IGNORE for lab in row.labels[:len(expected)])
        assert pipe.tokenizer.decode(row.labels[len(expected):], skip_special_tokens=False) == "red</s>\n"
        per_image = [img.num_tokens for img in images] if fusion == "early" else [1] * n
        assert row.input_ids.count(IMAGE) == sum(per_image)


def test_images_go_in_front_with_the_models_separator():
    llava = PromptLayout(ByteTokenizer(), TextConfig(), CROSS)
    mllama = PromptLayout(ByteTokenizer(), TextConfig(bos_after_leading_images=True), CROSS)
    assert llava.place_media("hi", 2) == "<image><image>\nhi"  # LLaVA: "<image>\ntext"
    assert mllama.place_media("hi", 2) == "<image><image>hi"  # Mllama's processor: "<|image|>text"
    assert llava.place_media("a <image> b", 1) == "a <image> b"
    assert llava.place_media("hi", 0) == "hi"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    placed = llava.place_media_in_messages(messages, 1)
    assert [m["content"] for m in placed] == ["S", "<image>\nq", "a", "q2"]  # the first user turn
    assert messages[1]["content"] == "q"  # the caller's messages are left alone


def test_mllama_bos_rule_without_chat():
    layout = PromptLayout(ByteTokenizer(), TextConfig(bos_after_leading_images=True), EARLY)
    hi = [ord("h"), ord("i")]
    # The reference: leading images, then bos, then text; the tokenizer's own bos in front of all.
    assert layout.encode("hi", [2]) == [BOS, IMAGE, IMAGE, BOS, *hi]
    assert layout.encode("<image>hi", [1]) == [BOS, IMAGE, BOS, *hi]
    assert layout.encode("hi <image>", [1]) == [BOS, BOS, *hi, ord(" "), IMAGE]
    assert layout.encode("<s>hi", []) == [BOS, BOS, *hi]  # a prompt with bos gets no second one inside
    plain = PromptLayout(ByteTokenizer(), TextConfig(), EARLY)
    assert plain.encode("hi", [2]) == [BOS, IMAGE, IMAGE, ord("\n"), *hi]
    assert plain.encode("<s>hi", []) == [BOS, *hi]  # never doubled


def test_fusion_decides_positions_per_placeholder():
    ids = [BOS, IMAGE, 5, IMAGE]
    early = PromptLayout.for_model(tiny_config("early"), ByteTokenizer())
    cross = PromptLayout.for_model(tiny_config("cross"), ByteTokenizer())
    assert early.expand(ids, [3, 2]) == [BOS, IMAGE, IMAGE, IMAGE, 5, IMAGE, IMAGE]
    assert cross.expand(ids, [3, 2]) == ids
    assert early.media_span([3, 2]) == [IMAGE] * 5 and cross.media_span([3, 2]) == [IMAGE] * 2  # plan --measure


def test_text_only_model_takes_the_prompt_as_text():
    config = dataclasses.replace(tiny_config("early"), vision=None)
    layout = PromptLayout.for_model(config, ByteTokenizer())
    assert layout.encode("<image> hi") == ByteTokenizer().encode("<image> hi")
    with pytest.raises(FeatureCountError, match="text-only model; it takes no images \\(1 given\\)"):
        layout.encode("hi", [4])


def test_early_fusion_expands_each_placeholder_to_its_image_tokens():
    expand = _pipeline(_config("early")).layout.expand
    assert expand([1, IMAGE, 2, IMAGE, 3], [3, 1]) == [1, IMAGE, IMAGE, IMAGE, 2, IMAGE, 3]
    assert expand([1, 2], []) == [1, 2]
    with pytest.raises(FeatureCountError, match="the prompt has 2 image placeholders but 3 images were given"):
        expand([IMAGE, 5, IMAGE], [4, 4, 4])
    with pytest.raises(FeatureCountError, match="the prompt has 0 image placeholders but 1 image was given"):
        expand([5], [4])
    with pytest.raises(FeatureCountError, match="at least one token"):
        expand([IMAGE], [0])


# --- one error, both counts, wherever the prompt is built --------------------------------------


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_placeholders_and_images_disagree_is_one_error_naming_both_counts(tmp_path, fusion):
    pipe = _pipeline(_config(fusion))
    one = pipe.process_images([scene()])
    message = "has 2 image placeholders (<image>) but 1 image was given"
    for chat in (False, True):
        with pytest.raises(FeatureCountError) as err:
            pipe.prompt_ids("<image> and <image>", one, chat=chat)
        assert str(err.value) == f"the prompt {message}"
    builder = _builder(pipe)
    turns = [("user", "<image> and"), ("assistant", "a"), ("user", "<image>?"), ("assistant", "b")]
    for build in (lambda: builder.build(turns, one), lambda: builder.prompt(turns[:3], one)):
        with pytest.raises(FeatureCountError) as err:
            build()
        assert str(err.value) == f"the conversation {message}"
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image> and <image>"},
                                                  {"from": "gpt", "value": "b"}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    with pytest.raises(FeatureCountError) as err:
        read_llava_json(tmp_path / "data.json", tmp_path, on_error="raise", check_images=False)
    assert str(err.value).endswith(f"record 0: the conversation {message}")


@pytest.mark.parametrize("preset", ["tiny-early", "tiny-cross"])
def test_trainer_builds_the_prompt_generate_builds(tmp_path, preset):
    from omnifuse.training.config import TrainConfig
    from omnifuse.training.loop import Trainer

    cfg = TrainConfig(model=preset, train_size=8, val_size=4, batch_size=2, steps=1, image_size=64,
                      out_dir=str(tmp_path))
    trainer = Trainer(cfg, quiet=True)
    pipe = Pipeline(trainer.model, trainer.tokenizer)
    turns, sources, _ = trainer.train_source[0]
    images = pipe.process_images(sources)
    question = turns[0][1]
    assert trainer.builder.prompt(turns[:1], images) == pipe.prompt_ids(question, images, chat=True)
