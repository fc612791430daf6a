"""Mistral and Mixtral text checkpoints in Hugging Face layout (``MistralForCausalLM``,
``MixtralForCausalLM``): Llama-style decoders whose attention may be a sliding window
(``sliding_window``: every layer sees its last W positions, its own included; omnifuse's
``sliding`` layer kind with a W-slot ring cache), Mixtral's feed-forward a softmax top-k mixture
of experts (omnifuse's ``moe`` layer kind, router ``softmax``).

The files keep Mixtral's experts one by one (``block_sparse_moe.experts.N.w1/w2/w3``: gate, down,
up) beside the router (``block_sparse_moe.gate``), as transformers writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import DecoderConfig, LayerSpec, ModelConfig, TextConfig
from omnifuse.interop.hf import KeyMap, build_on_meta, llama_decoder_key_map, llama_decoder_kwargs, load_mapped

__all__ = ["load_mistral", "mistral_config", "mistral_key_map", "sliding_window_kwargs"]


def sliding_window_kwargs(text: dict[str, Any], where: str) -> dict[str, Any]:
    """DecoderConfig fields for a HF ``sliding_window`` (None or 0: full attention)."""
    window = text.get("sliding_window")
    if not window:
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise CheckpointError(f"{where}: sliding_window must be a positive integer or null, got {window!r}")
    return dict(sliding_window=window)


def mistral_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a Mistral or Mixtral ``config.json``: text only, no placeholders."""
    where = str(Path(folder) / "config.json")
    kwargs = llama_decoder_kwargs(hf)
    kwargs.update(sliding_window_kwargs(hf, where))
    feed_forward = "dense"
    if hf.get("model_type") == "mixtral":
        feed_forward = "moe"
        experts, top_k = hf.get("num_local_experts", 8), hf.get("num_experts_per_tok", 2)
        if not isinstance(experts, int) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
            raise CheckpointError(f"{where}: num_experts_per_tok {top_k!r} must be in 1..num_local_experts ({experts!r})")
        kwargs.update(num_experts=experts, experts_per_token=top_k, router="softmax")
    attention = "sliding" if kwargs.get("sliding_window") else "full"
    kwargs["layer_pattern"] = (LayerSpec(attention=attention, feed_forward=feed_forward),)
    return ModelConfig(name=Path(folder).name, vision=None, decoder=DecoderConfig(**kwargs),
                       text=TextConfig(tokenizer="file", placeholder_tokens={}))


def mistral_key_map() -> KeyMap:
    experts = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\."
    return [
        (rf"{experts}w1\.weight", r"decoder.layers.\1.mlp.experts.\2.gate_proj.weight"),
        (rf"{experts}w3\.weight", r"decoder.layers.\1.mlp.experts.\2.up_proj.weight"),
        (rf"{experts}w2\.weight", r"decoder.layers.\1.mlp.experts.\2.down_proj.weight"),
        (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"decoder.layers.\1.mlp.router.weight"),
        *llama_decoder_key_map("model."),
    ]


def load_mistral(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    model = build_on_meta(mistral_config(hf, folder))
    return load_mapped(model, folder, mistral_key_map(), device=device).eval()
