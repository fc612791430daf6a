"""The seam a compressing connector plugs into: its ``num_output_tokens`` decides the processor's
token counts, and so the prompt layout, the fused sequence and the cost figures, with no other
change. The 2x2-pooling connector here is registered for the test only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import PLACEHOLDER, make_model, scene, tiny_config
from torch import nn

from omnifuse.config import ConnectorConfig
from omnifuse.connectors import CONNECTORS, Connector
from omnifuse.errors import FeatureCountError
from omnifuse.planner.costs import image_cost, request_cost


class Pool2Connector(Connector):
    """Average-pools each crop's patch grid 2x2, then projects: a quarter of the tokens."""

    @staticmethod
    def num_output_tokens(config, tokens, grid):
        assert grid is not None and grid[0] * grid[1] == tokens, "the test connector takes a patch grid"
        return (grid[0] // 2) * (grid[1] // 2)

    def __init__(self, in_dim, out_dim, bias=True, positions=0):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x, grid=None):  # (N, rows*cols, D) -> (N, rows*cols/4, D_out)
        n, _, d = x.shape
        patches = x.transpose(1, 2).reshape(n, d, *grid)
        return self.proj(F.avg_pool2d(patches, 2).flatten(2).transpose(1, 2))


@pytest.fixture
def pooled_config(monkeypatch):
    monkeypatch.setitem(CONNECTORS, "pool2", Pool2Connector)
    return dataclasses.replace(tiny_config("early"), connector=ConnectorConfig(type="pool2"))


def test_a_compressing_connector_sets_the_token_count_everywhere(pooled_config):
    model = make_model(pooled_config)
    image = model.image_processor(scene(40, 30))
    assert image.num_tokens == 4  # a 32 px crop of 8 px patches: 4x4 features, pooled to 2x2
    assert pooled_config.tokens_per_crop == 4
    assert model.encode_media([image])[0].shape == (4, pooled_config.decoder.hidden_size)
    ids = torch.tensor([[5, 6] + [PLACEHOLDER] * 4 + [7]])
    with torch.no_grad():
        assert model(ids, images=[[image]]).shape == (1, 7, 260)
    cost = image_cost(pooled_config, 40, 30)
    assert (cost.visual_tokens, cost.context_tokens) == (4, 4)
    assert request_cost(pooled_config, 7, [cost]).visual_tokens == 4


def test_a_connector_that_breaks_its_own_count_is_caught(pooled_config, monkeypatch):
    monkeypatch.setattr(Pool2Connector, "num_output_tokens", staticmethod(lambda config, tokens, grid: 5))
    model = make_model(pooled_config)
    image = model.image_processor(scene(40, 30))
    with pytest.raises(FeatureCountError, match="produced 4 tokens but its processor predicted 5"):
        model.encode_media([image])
