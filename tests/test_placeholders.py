"""Placeholder tokens come from the config, per modality: the model reads them there, the tokenizer
must agree with them, and a config whose tokenizer alone knows them is completed before the model
is built."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import scene, tiny_config
from hf_fixtures import write_word_tokenizer

from omnifuse.config import ConfigError, TextConfig
from omnifuse.errors import FeatureCountError, TokenizerError
from omnifuse.model import build_model
from omnifuse.pipeline import Pipeline
from omnifuse.processing.text import load_tokenizer, with_placeholder_ids

SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<img>": 250}


def file_config(tmp_path, **text):
    write_word_tokenizer(tmp_path, 260, SPECIALS)
    return dataclasses.replace(tiny_config("early"), text=TextConfig(
        tokenizer="file", placeholder_tokens={"image": "<img>"}, pad_token="<pad>", **text))


def test_a_file_tokenizer_model_without_placeholder_ids_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no id for the image placeholder '<img>'.*with_placeholder_ids"):
        build_model(file_config(tmp_path))


def test_the_tokenizer_completes_the_config_and_the_model_reads_it(tmp_path):
    config = file_config(tmp_path)
    tokenizer = load_tokenizer(config.text, tmp_path)
    complete = with_placeholder_ids(config, tokenizer)
    assert complete.text.placeholder_ids == {"image": 250}
    assert config.text.placeholder_ids == {}  # the given config is not changed
    torch.manual_seed(0)
    pipe = Pipeline(build_model(complete), tokenizer)
    assert pipe.model.placeholder_ids == {"image": 250}
    image = pipe.process_images([scene(32, 32)])[0]
    ids = pipe.prompt_ids("hello", [image])
    assert ids.count(250) == image.num_tokens  # the tokenizer's id is where the features go
    with torch.no_grad():
        pipe.model(torch.tensor([ids]), images=[[image]])
        with pytest.raises(FeatureCountError, match="16 image placeholder tokens but its 0 image items"):
            pipe.model(torch.tensor([ids]))


def test_a_config_and_tokenizer_that_disagree_are_refused(tmp_path):
    config = file_config(tmp_path, placeholder_ids={"image": 249})
    tokenizer = load_tokenizer(config.text, tmp_path)
    with pytest.raises(TokenizerError, match="image token id 249 differs from the tokenizer's id 250 for '<img>'"):
        with_placeholder_ids(config, tokenizer)
    with pytest.raises(TokenizerError, match="image token id 249 differs from the tokenizer's id 250 for '<img>'"):
        Pipeline(build_model(config), tokenizer)


def test_a_text_model_reads_the_image_token_as_text():
    config = dataclasses.replace(tiny_config("early"), vision=None)
    model = build_model(config)
    assert model.placeholder_ids == {}
    with torch.no_grad():
        out = model(torch.tensor([[5, 259, 6]]))  # 259 is <image> in the byte vocabulary: a plain token here
    assert out.shape == (1, 3, 260)
