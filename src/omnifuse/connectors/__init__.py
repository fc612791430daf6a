"""Connectors turn encoder features into decoder-width tokens; ``CONNECTORS`` maps config names
(``connector.type``) to their classes (ARCHITECTURE.md, "Adding a connector")."""

from __future__ import annotations

from omnifuse.connectors.base import Connector
from omnifuse.connectors.perceiver import PerceiverConnector
from omnifuse.connectors.projection import LinearConnector, MLPConnector
from omnifuse.connectors.qformer import QFormerConnector
from omnifuse.connectors.spatial import PixelShuffleConnector, PoolConnector

__all__ = ["CONNECTORS", "Connector", "LinearConnector", "MLPConnector", "PerceiverConnector", "PixelShuffleConnector",
           "PoolConnector", "QFormerConnector", "crop_tokens", "encoder_tokens"]

CONNECTORS: dict[str, type[Connector]] = {
    "linear": LinearConnector,
    "mlp": MLPConnector,
    "qformer": QFormerConnector,
    "perceiver": PerceiverConnector,
    "pixel_shuffle": PixelShuffleConnector,
    "pool": PoolConnector,
}


def encoder_tokens(vision, grid: tuple[int, int]) -> tuple[int, tuple[int, int] | None]:
    """(features the vision encoder hands on for one crop of a (rows, cols) patch grid, the grid
    they still form or None): patches plus kept class tokens, less what token merging removed."""
    from omnifuse.encoders.tome import merged_tokens

    if vision.merge_tokens:
        # every layer that runs merges up to r tokens
        n = merged_tokens(grid[0] * grid[1] + int(vision.use_cls), vision.merge_tokens, vision.layers_run,
                          protected=int(vision.use_cls))
        return n - int(vision.use_cls) + vision.cls_tokens, None
    return grid[0] * grid[1] + vision.cls_tokens, (grid if vision.cls_tokens == 0 else None)


def crop_tokens(config, grid: tuple[int, int]) -> int:
    """Tokens one crop of a (rows, cols) patch grid becomes in the model ``config`` (a
    ``ModelConfig``): the encoder's features through the connector's ``num_output_tokens``."""
    tokens, feature_grid = encoder_tokens(config.vision, grid)
    return CONNECTORS[config.connector.type].num_output_tokens(config.connector, tokens, feature_grid)
