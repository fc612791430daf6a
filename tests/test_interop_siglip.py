"""The SigLIP vision tower of Idefics3 / SmolVLM and their pixel-shuffle connector, against the
reference modules (transformers' Idefics3VisionTransformer and Idefics3Connector) with the same
weights: the building blocks of those checkpoints. Full-size crops only, which is what the
reference's processor makes (its bucketed position ids are then the learned grid itself)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from omnifuse.config import ConnectorConfig, ImageConfig, ModelConfig, VisionConfig
from omnifuse.interop.hf import _map_key, siglip_vision_key_map, siglip_vision_kwargs
from omnifuse.model import build_model

idefics3 = pytest.importorskip("transformers.models.idefics3.modeling_idefics3")
from transformers import Idefics3Config, Idefics3VisionConfig

CONFIGS = [
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, image_size=48, patch_size=8),
    dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
         hidden_act="gelu"),
]


def _spread(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _ours(vision_kwargs, scale):
    vision = VisionConfig(**siglip_vision_kwargs(vision_kwargs, "test"))
    config = ModelConfig(vision=vision, image=ImageConfig(mode="fixed", image_size=vision.image_size),
                         connector=ConnectorConfig(type="pixel_shuffle", scale_factor=scale, bias=False))
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, vocab_size=300, hidden_size=64,
                                                                     num_layers=1, num_heads=4, num_kv_heads=4,
                                                                     intermediate_size=64))
    return build_model(config).eval()


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_siglip_tower_and_pixel_shuffle_connector_equal_idefics3s(i):
    kwargs = CONFIGS[i]
    side = kwargs["image_size"] // kwargs["patch_size"]
    scale = 2 if side % 2 == 0 else side
    hf_config = Idefics3Config(vision_config=Idefics3VisionConfig(**kwargs),
                               text_config={"hidden_size": 64, "vocab_size": 300, "num_hidden_layers": 1,
                                            "num_attention_heads": 4, "intermediate_size": 64},
                               scale_factor=scale)
    torch.manual_seed(i)
    tower = idefics3.Idefics3VisionTransformer(hf_config.vision_config).eval()
    connector = idefics3.Idefics3Connector(hf_config).eval()
    _spread(tower, i)
    _spread(connector, i + 10)
    model = _ours(kwargs, scale)
    key_map = siglip_vision_key_map("vision_model.")
    own = model.state_dict()
    with torch.no_grad():
        for key, value in tower.state_dict().items():
            known, target = _map_key(f"vision_model.{key}", key_map)
            assert known, key
            for name, _ in target or ():  # plain renames: the tensor as it is
                own[name].copy_(value)
        own["connectors.image.proj.weight"].copy_(connector.modality_projection.proj.weight)
    pixels = torch.randn(3, 3, kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        reference = tower(pixel_values=pixels).last_hidden_state
        ours = model.encoders["image"](pixels)
        assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
        tokens = model.connectors["image"](ours, grid=(side, side))
        assert torch.allclose(tokens, connector(reference), atol=1e-5)
    assert tokens.shape[1] == model.config.tokens_per_crop == side * side // scale**2
