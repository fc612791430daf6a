"""Inference: caches, sampling and generation."""

from omnifuse.inference.batching import DecodeBatch, Request
from omnifuse.inference.cache import CrossAttentionCache, InferenceCache, KVCache, LayerKVCache
from omnifuse.inference.generate import ContextOverflowError, Step, generate, generate_stream, left_pad
from omnifuse.inference.sampling import SamplingConfig, sample_next

__all__ = [
    "ContextOverflowError",
    "CrossAttentionCache",
    "DecodeBatch",
    "InferenceCache",
    "KVCache",
    "LayerKVCache",
    "Request",
    "SamplingConfig",
    "Step",
    "generate",
    "generate_stream",
    "left_pad",
    "sample_next",
]
