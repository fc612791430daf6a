"""Model configuration (omnifuse.config, omnifuse.presets): validation, derived fields, round trips."""

from __future__ import annotations

import dataclasses
import json

import pytest

from omnifuse.config import (
    ConfigError,
    ConnectorConfig,
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from omnifuse.presets import PRESETS, get_preset, preset_names

ALL_PRESETS = sorted(PRESETS)


# --- validation: each bad value raises ConfigError naming the field -------------------------

BAD_VALUES = [
    # (config class, kwargs, words the message must contain)
    (VisionConfig, {"image_size": 225, "patch_size": 14}, ["image_size", "patch_size", "225", "14"]),
    (VisionConfig, {"hidden_size": 100, "num_heads": 12}, ["hidden_size", "num_heads", "100", "12"]),
    (VisionConfig, {"num_layers": 0}, ["vision.num_layers"]),
    (VisionConfig, {"patch_size": -14}, ["vision.patch_size"]),
    (VisionConfig, {"activation": "relu6"}, ["vision.activation", "relu6"]),
    (VisionConfig, {"feature_select": "cls"}, ["vision.feature_select", "cls"]),
    (VisionConfig, {"num_layers": 12, "feature_layer": 13}, ["vision.feature_layer", "13"]),
    (VisionConfig, {"num_layers": 12, "feature_layer": -14}, ["vision.feature_layer", "-14"]),
    (VisionConfig, {"num_layers": 12, "feature_layer": (3, 99)}, ["vision.feature_layer", "99"]),
    (ImageConfig, {"mode": "mosaic"}, ["image.mode", "mosaic"]),
    (ImageConfig, {"resize": "squash"}, ["image.resize", "squash"]),
    (ImageConfig, {"image_size": 0}, ["image.image_size"]),
    (ImageConfig, {"min_patches": 10, "max_patches": 4}, ["min_patches", "max_patches"]),
    (ImageConfig, {"max_tiles": 0}, ["image.max_tiles"]),
    (ImageConfig, {"mean": (0.5, 0.5)}, ["image.mean"]),
    (ImageConfig, {"max_pixels": 0}, ["image.max_pixels"]),
    (ConnectorConfig, {"type": "conv"}, ["connector.type", "conv", "linear", "mlp", "qformer"]),
    (FusionConfig, {"type": "late"}, ["fusion.type", "late"]),
    (FusionConfig, {"type": "cross"}, ["cross_attention_layers", "cross_attention_every"]),
    (FusionConfig, {"type": "cross", "cross_attention_layers": (1,), "cross_attention_every": 2},
     ["cross_attention_layers", "cross_attention_every"]),
    (FusionConfig, {"type": "cross", "cross_attention_layers": (1, 1)}, ["cross_attention_layers", "duplicates"]),
    (FusionConfig, {"cross_attention_every": -1}, ["fusion.cross_attention_every"]),
    (DecoderConfig, {"hidden_size": 100, "num_heads": 3}, ["hidden_size", "num_heads", "100", "3"]),
    (DecoderConfig, {"num_heads": 32, "num_kv_heads": 5}, ["num_heads", "num_kv_heads", "5"]),
    (DecoderConfig, {"hidden_size": 96, "num_heads": 32}, ["head_dim", "3"]),  # head_dim 3: odd, no RoPE
    (DecoderConfig, {"vocab_size": 0}, ["decoder.vocab_size"]),
    (DecoderConfig, {"max_position": -1}, ["decoder.max_position"]),
    (TextConfig, {"tokenizer": "sentencepiece"}, ["text.tokenizer", "sentencepiece"]),
]


@pytest.mark.parametrize("cls, kwargs, words", BAD_VALUES,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in BAD_VALUES])
def test_bad_value_raises_config_error_naming_the_field(cls, kwargs, words):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_config_error_is_a_value_error():
    # The CLI and servers treat ValueError as "bad input"; ConfigError must be one.
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("field", ["num_kv_heads", "head_dim"])
def test_negative_decoder_head_counts_are_rejected(field):
    with pytest.raises(ConfigError, match=field):
        DecoderConfig(hidden_size=128, num_heads=4, **{field: -2})


def test_wrongly_typed_value_names_the_field():
    # A YAML typo such as `image_size: "336"` must point at vision.image_size.
    with pytest.raises(ConfigError, match="image_size"):
        config_from_dict(ModelConfig, {"vision": {"image_size": "336"}})


def test_image_size_must_be_a_multiple_of_the_vision_patch_size():
    with pytest.raises(ConfigError, match="image.image_size 50 is not a multiple of vision.patch_size 14"):
        ModelConfig(vision=VisionConfig(), image=ImageConfig(mode="fixed", image_size=50))
    with pytest.raises(ConfigError, match="patch_size"):
        ModelConfig(vision=VisionConfig(), image=ImageConfig(mode="tiles", image_size=50))
    # Dynamic mode sizes crops itself in whole patches: image_size is not a crop size there.
    assert ModelConfig(image=ImageConfig(mode="dynamic", image_size=50)).image.mode == "dynamic"


@pytest.mark.parametrize("layers", [(1, 5), (-1,), (100,)])
def test_cross_attention_layer_index_out_of_range(layers):
    # 0..num_layers: index num_layers places the block after the last decoder layer (Mllama allows it).
    with pytest.raises(ConfigError, match=r"fusion\.cross_attention_layers index -?\d+ is outside 0\.\.4"):
        ModelConfig(fusion=FusionConfig(type="cross", cross_attention_layers=layers),
                    decoder=DecoderConfig(num_layers=4))


def test_sub_configs_must_be_config_objects():
    with pytest.raises(ConfigError, match="vision"):
        ModelConfig(vision={"image_size": 224})  # a dict is not a VisionConfig


# --- derived fields -------------------------------------------------------------------------


def test_num_kv_heads_zero_means_multi_head_attention():
    d = DecoderConfig(hidden_size=256, num_heads=8, num_kv_heads=0)
    assert d.num_kv_heads == 8
    assert DecoderConfig(hidden_size=256, num_heads=8, num_kv_heads=2).num_kv_heads == 2


def test_head_dim_is_derived_or_kept():
    assert DecoderConfig(hidden_size=256, num_heads=8).head_dim == 32
    # An explicit head_dim wins, even where hidden_size / num_heads differs (Gemma-style).
    assert DecoderConfig(hidden_size=256, num_heads=8, head_dim=64).head_dim == 64


def test_derived_fields_are_stable_through_a_round_trip():
    d = DecoderConfig(hidden_size=256, num_heads=8)
    again = config_from_dict(DecoderConfig, config_to_dict(d))
    assert again == d and again.num_kv_heads == 8 and again.head_dim == 32


def test_vision_derived_properties():
    v = VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_heads=16, feature_layer=[-2, -1], feature_select="full")
    assert v.feature_layer == (-2, -1)  # a list from JSON is settled to a tuple
    assert v.feature_layers == (-2, -1)
    assert v.cls_tokens == 1
    assert v.feature_dim == 2048
    assert VisionConfig(feature_select="default").cls_tokens == 0
    assert VisionConfig(use_cls=False, feature_select="full").cls_tokens == 0


def test_image_mean_std_settle_to_float_tuples():
    cfg = ImageConfig(mean=[0, 1, 0], std=[1, 1, 1])
    assert cfg.mean == (0.0, 1.0, 0.0) and all(isinstance(x, float) for x in cfg.mean)
    assert cfg.std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("every, num_layers, expected", [
    (4, 32, (3, 7, 11, 15, 19, 23, 27, 31)),  # Llama 3.2 Vision: 8 cross layers in 32
    (1, 3, (0, 1, 2)),
    (2, 5, (1, 3)),
    (5, 4, ()),  # fewer layers than the period: no cross layer
])
def test_resolved_layers_every_n(every, num_layers, expected):
    assert FusionConfig(type="cross", cross_attention_every=every).resolved_layers(num_layers) == expected


def test_resolved_layers_explicit_list_is_sorted():
    assert FusionConfig(type="cross", cross_attention_layers=[3, 1]).resolved_layers(4) == (1, 3)


def test_early_fusion_has_no_cross_layers():
    assert FusionConfig(type="early").resolved_layers(32) == ()
    assert get_preset("tiny-early").cross_layers == ()


def test_preset_cross_layers():
    assert get_preset("tiny-cross").cross_layers == (1, 3)
    assert get_preset("llama-3.2-11b-vision").cross_layers == (3, 7, 11, 15, 19, 23, 27, 31)


# --- serialisation --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_save_load_round_trip_gives_an_equal_config(tmp_path, name, suffix):
    cfg = get_preset(name)
    path = tmp_path / f"config{suffix}"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.vision.feature_layer == cfg.vision.feature_layer  # tuple survives (llama: 6 layers)
    assert loaded.cross_layers == cfg.cross_layers


def test_saved_json_is_plain_nested_json(tmp_path):
    path = tmp_path / "c.json"
    save_config(get_preset("tiny-cross"), path)
    data = json.loads(path.read_text())
    assert data["name"] == "tiny-cross"
    assert data["fusion"]["type"] == "cross"
    assert data["fusion"]["cross_attention_layers"] == [1, 3]  # tuples are written as JSON lists
    assert data["decoder"]["num_kv_heads"] == 2


def test_saved_yaml_is_readable_yaml(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    save_config(get_preset("llava-1.5-7b"), path)
    data = yaml.safe_load(path.read_text())
    assert data["vision"]["image_size"] == 336
    assert data["image"]["resize"] == "pad"


def test_hand_written_partial_config_gets_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndecoder:\n  hidden_size: 256\n  num_heads: 8\n  rope_theta: 500000\n")
    cfg = load_config(path)
    assert cfg.name == "mine"
    assert cfg.decoder.head_dim == 32
    assert cfg.decoder.rope_theta == 500000.0 and isinstance(cfg.decoder.rope_theta, float)
    assert cfg.vision == VisionConfig()


@pytest.mark.parametrize("data, key, where", [
    ({"nmae": "x"}, "nmae", "ModelConfig"),
    ({"vision": {"image_sise": 224}}, "image_sise", "vision"),
    ({"fusion": {"type": "cross", "cross_layers": [1]}}, "cross_layers", "fusion"),
])
def test_unknown_keys_raise_naming_the_key(tmp_path, data, key, where):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value)
    assert where in str(err.value)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.json")


def test_load_config_invalid_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


def test_load_config_not_a_mapping(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_bad_value_in_a_file_names_the_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"connector": {"type": "resampler"}}))
    with pytest.raises(ConfigError, match="connector.type 'resampler' unknown"):
        load_config(path)


# --- presets --------------------------------------------------------------------------------


def test_preset_names():
    assert preset_names() == ["llama-3.2-11b-vision", "llama-3.2-90b-vision", "llama-4-maverick", "llama-4-scout",
                              "llava-1.5-7b", "smolvlm-256m",
                              "tiny-blip2", "tiny-cross", "tiny-early", "tiny-flamingo", "tiny-idefics3",
                              "tiny-infini", "tiny-llama4", "tiny-moe", "tiny-omni-cross", "tiny-omni-early", "tiny-pool",
                              "tiny-sliding", "tiny-tome"]


def test_llama_3_2_90b_vision_preset_has_the_published_shape():
    from omnifuse.planner.costs import count_parameters

    cfg = get_preset("llama-3.2-90b-vision")
    assert len(cfg.cross_layers) == 20 and cfg.decoder.num_layers == 80  # HF's 100-layer stack
    assert cfg.vision == get_preset("llama-3.2-11b-vision").vision
    assert count_parameters(cfg)["total"] == pytest.approx(88.6e9, rel=0.002)  # "88.6B" on the model card


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_get_preset_returns_its_named_config(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ModelConfig)
    assert cfg.name == name


def test_unknown_preset_error_lists_known_presets():
    with pytest.raises(ConfigError) as err:
        get_preset("llava-2")
    msg = str(err.value)
    assert "'llava-2'" in msg
    for name in ALL_PRESETS:
        assert name in msg


def test_tiny_presets_fit_the_byte_tokenizer():
    for name in ("tiny-early", "tiny-cross"):
        cfg = get_preset(name)
        assert cfg.text.tokenizer == "bytes"
        assert cfg.decoder.vocab_size >= 260


# --- immutability ---------------------------------------------------------------------------


@pytest.mark.parametrize("obj, field", [
    (get_preset("tiny-early"), "name"),
    (get_preset("tiny-early").vision, "image_size"),
    (get_preset("tiny-early").image, "mode"),
    (get_preset("tiny-early").connector, "type"),
    (get_preset("tiny-cross").fusion, "cross_attention_layers"),
    (get_preset("tiny-early").decoder, "num_kv_heads"),
    (get_preset("tiny-early").text, "placeholder_tokens"),
])
def test_configs_are_frozen(obj, field):
    before = getattr(obj, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, before)
    assert getattr(obj, field) == before


def test_replace_revalidates():
    # dataclasses.replace is how a config is changed; it must run the same checks.
    cfg = get_preset("tiny-early")
    with pytest.raises(ConfigError, match="num_heads"):
        dataclasses.replace(cfg.decoder, num_heads=3)
    wider = dataclasses.replace(cfg.decoder, hidden_size=256, head_dim=0)
    assert wider.head_dim == 64


# --- placeholders: one map per modality, in the config ----------------------------------------


def test_byte_tokenizer_placeholder_ids_are_filled_in_and_checked():
    assert TextConfig().placeholder_ids == {"image": 259}  # ByteTokenizer's <image>
    with pytest.raises(ConfigError, match="placeholder_ids.image is 5 but the byte tokenizer's '<image>' is 259"):
        TextConfig(placeholder_ids={"image": 5})
    with pytest.raises(ConfigError, match="placeholder_ids names modalities without a placeholder token: .'audio'."):
        TextConfig(tokenizer="file", placeholder_ids={"audio": 3})


def test_placeholder_maps_cannot_be_edited_in_place():
    given = {"image": "<image>"}
    text = TextConfig(placeholder_tokens=given)
    given["image"] = "<other>"  # the config took a copy
    assert text.placeholder_tokens == {"image": "<image>"}
    with pytest.raises(TypeError, match="cannot be changed"):
        text.placeholder_ids["image"] = 1
    assert text.placeholder_ids == {"image": 259}
    assert dataclasses.replace(text, placeholder_ids={"image": 259}) == text


def test_a_vision_model_needs_an_image_placeholder_inside_its_vocabulary():
    cfg = get_preset("tiny-early")
    with pytest.raises(ConfigError, match="needs text.placeholder_tokens.image"):
        dataclasses.replace(cfg, text=TextConfig(placeholder_tokens={}))
    small = dataclasses.replace(cfg.decoder, vocab_size=200)
    with pytest.raises(ConfigError, match="placeholder_ids.image 259 is outside the decoder's 200 embeddings"):
        dataclasses.replace(cfg, decoder=small)
    assert dataclasses.replace(cfg, vision=None, decoder=small).modalities == ()  # a text model has no placeholder


def test_configs_saved_with_the_old_image_token_key_still_load(tmp_path):
    data = config_to_dict(get_preset("llava-1.5-7b"))
    data["text"].pop("placeholder_tokens")
    data["text"]["image_token"] = "<image>"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert load_config(path) == get_preset("llava-1.5-7b")
    data["text"]["placeholder_tokens"] = {"image": "<image>"}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="either image_token .the old key. or placeholder_tokens"):
        load_config(path)


@pytest.mark.parametrize("value, words", [(["<image>"], "must be a mapping"), ({"image": 3}, "token string")])
def test_malformed_placeholder_map_names_the_field(value, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict(TextConfig, {"placeholder_tokens": value})
