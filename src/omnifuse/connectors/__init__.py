"""Connectors project encoder features to the decoder width; ``CONNECTORS`` maps config names to builders."""

from omnifuse.connectors.projection import CONNECTORS, LinearConnector, MLPConnector

__all__ = ["CONNECTORS", "LinearConnector", "MLPConnector"]
