"""The text decoder (omnifuse.decoder): layers built from specs, usable on its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from omnifuse.config import ConfigError, DecoderConfig, LayerSpec, ModelConfig, config_from_dict, config_to_dict
from omnifuse.decoder import ATTENTION, FEED_FORWARD, TextDecoder, build_decoder


def text_config(pattern=(LayerSpec(),), layers: int = 4) -> ModelConfig:
    return ModelConfig(vision=None, decoder=DecoderConfig(vocab_size=64, hidden_size=32, num_layers=layers, num_heads=4,
                                                          num_kv_heads=2, intermediate_size=64, max_position=64,
                                                          layer_pattern=pattern), init_std=0.1)


def test_pattern_tiles_to_the_layers_and_cross_attention_comes_from_fusion():
    cfg = dataclasses.replace(tiny_config("cross", cross_layers=(0, 2, 3)),
                              decoder=dataclasses.replace(tiny_config().decoder,
                                                          layer_pattern=(LayerSpec(), LayerSpec(rope=False))))
    specs = cfg.layer_specs
    assert [s.rope for s in specs] == [True, False, True]
    assert [s.cross_attention for s in specs] == [True, False, True]
    assert cfg.final_cross_attention  # index 3 = after the last of 3 layers
    decoder = build_decoder(cfg)
    assert sorted(decoder.cross_layers) == ["0", "2", "3"]
    assert [layer.use_rope for layer in decoder.layers] == [True, False, True]


def test_layer_pattern_round_trips_and_bad_kinds_are_named():
    cfg = text_config((LayerSpec(), LayerSpec(rope=False)))
    data = config_to_dict(cfg)
    assert data["vision"] is None and data["decoder"]["layer_pattern"][1]["rope"] is False
    assert config_from_dict(ModelConfig, data) == cfg
    data["decoder"]["layer_pattern"][0]["attention"] = "sparse"
    with pytest.raises(ConfigError, match=r"attention 'sparse' unknown; known: \['chunked', 'full', 'infini', 'sliding'\]"):
        config_from_dict(ModelConfig, data)
    with pytest.raises(ConfigError, match=r"feed_forward 'sparse' unknown; known: \['dense', 'moe'\]"):
        LayerSpec(feed_forward="sparse")
    with pytest.raises(ConfigError, match="fusion.cross_attention_layers"):
        DecoderConfig(layer_pattern=(LayerSpec(cross_attention=True),))
    assert set(ATTENTION) == {"full", "sliding", "chunked", "infini"} and set(FEED_FORWARD) == {"dense", "moe"}


def _decoder(pattern, seed=0) -> TextDecoder:
    torch.manual_seed(seed)
    decoder = build_decoder(text_config(pattern, layers=1)).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(std=0.3)
    return decoder


def test_a_nope_layer_ignores_token_order_and_a_rope_layer_does_not():
    # Without positions, causal attention's last query sees an unordered set of keys.
    ids, swapped = torch.tensor([[5, 9, 17, 3]]), torch.tensor([[9, 5, 17, 3]])
    with torch.no_grad():
        nope = _decoder((LayerSpec(rope=False),))
        torch.testing.assert_close(nope(ids)[:, -1], nope(swapped)[:, -1], atol=1e-5, rtol=1e-5)
        rope = _decoder((LayerSpec(),))
        assert not torch.allclose(rope(ids)[:, -1], rope(swapped)[:, -1], atol=1e-3)


def test_the_decoder_alone_decodes_with_its_cache_as_the_full_pass():
    decoder = _decoder((LayerSpec(), LayerSpec(rope=False)))
    ids = torch.tensor([[1, 7, 22, 40, 13, 2, 8]])
    with torch.no_grad():
        full = decoder(ids)
        cache = decoder.new_cache(1, ids.shape[1])
        steps = [decoder(ids[:, :4], cache=cache)]
        steps += [decoder(ids[:, i:i + 1], cache=cache) for i in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        decoder.new_cache(1, 65)


def test_a_text_only_config_has_no_media_parts():
    from omnifuse.model import build_model

    model = build_model(text_config())
    assert model.vision_encoder is None and model.connector is None and model.image_processor is None
    assert all(n.startswith("decoder.") for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="text-only model"):
        dataclasses.replace(text_config(), fusion=tiny_config("cross").fusion)
