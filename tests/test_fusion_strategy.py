"""Fusion strategies are objects the rest of the code asks (omnifuse.fusion.strategy)."""

from __future__ import annotations

import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.config import ConfigError, FusionConfig
from omnifuse.fusion import FeatureCountError
from omnifuse.fusion.strategy import FUSIONS, CrossFusion, EarlyFusion


def test_strategies_say_what_a_media_item_costs():
    early, cross = EarlyFusion(FusionConfig()), CrossFusion(FusionConfig(type="cross", cross_attention_every=2))
    assert (early.placeholder_tokens(64), early.context_tokens(64), early.cross_states(64)) == (64, 64, 0)
    assert (cross.placeholder_tokens(64), cross.context_tokens(64), cross.cross_states(64)) == (1, 1, 64)
    with pytest.raises(ConfigError, match="fusion.type must be one of early, cross, got 'perceiver'"):
        FusionConfig(type="perceiver")


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_the_model_takes_the_placeholders_its_strategy_asks_for(fusion):
    model = make_model(tiny_config(fusion), gates=0.5)
    image = model.image_processor(scene(40, 30))
    n = model.fusion.placeholder_tokens(image.num_tokens)
    ids = torch.tensor([[5, 6] + [PLACEHOLDER] * n + [7, 8]])
    with torch.no_grad():
        assert model(ids, images=[[image]]).shape == (1, ids.shape[1], 260)
        short = torch.tensor([[5, 6] + [PLACEHOLDER] * (n + 1) + [7, 8]])
        with pytest.raises(FeatureCountError, match=rf"{n + 1} image placeholder tokens"):
            model(short, images=[[image]])
