"""The text decoder: token embedding, a stack of layers built from ``LayerSpec``s, final norm and
output head, with its own KV cache. Usable alone (a Llama text checkpoint) or inside a
``MultimodalModel``, which hands it spliced embeddings (early fusion) or media memory (cross)."""

from omnifuse.decoder.builder import ATTENTION, FEED_FORWARD, build_decoder, build_layer
from omnifuse.decoder.decoder import TextDecoder
from omnifuse.decoder.layer import DecoderLayer

__all__ = ["ATTENTION", "FEED_FORWARD", "DecoderLayer", "TextDecoder", "build_decoder", "build_layer"]
