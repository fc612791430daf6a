"""Llama text checkpoints in Hugging Face layout (``LlamaForCausalLM``): a text-only model whose
decoder is the same module LLaVA and Mllama use, with the same key names after ``model.``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import DecoderConfig, ModelConfig, TextConfig
from omnifuse.interop.hf import KeyMap, build_on_meta, llama_decoder_key_map, llama_decoder_kwargs, load_mapped

__all__ = ["llama_config", "llama_key_map", "load_llama"]


def llama_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a Llama ``config.json``: text only, no placeholders."""
    if hf.get("sliding_window"):
        raise CheckpointError(f"{Path(folder) / 'config.json'}: sliding_window is not supported for llama")
    config = ModelConfig(name=Path(folder).name, vision=None, decoder=DecoderConfig(**llama_decoder_kwargs(hf)),
                         text=TextConfig(tokenizer="file", placeholder_tokens={}))
    return config


def llama_key_map() -> KeyMap:
    return llama_decoder_key_map("model.")


def load_llama(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = llama_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, llama_key_map(), device=device).eval()
