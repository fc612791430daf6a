"""Connectors project encoder features to the decoder width; ``CONNECTORS`` maps config names to builders."""

from omnifuse.connectors.projection import CONNECTORS, LinearConnector, MLPConnector

__all__ = ["CONNECTORS", "LinearConnector", "MLPConnector", "crop_tokens"]


def crop_tokens(config, grid: tuple[int, int], extra: int) -> int:
    """Tokens the configured connector makes of one crop: a ``grid`` of patch features plus
    ``extra`` class tokens (``ConnectorConfig`` -> its class's ``crop_tokens``)."""
    return CONNECTORS[config.type].crop_tokens(config, grid, extra)
