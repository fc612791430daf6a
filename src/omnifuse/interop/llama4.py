"""Llama 4 checkpoints in Hugging Face layout: the text model (``llama4_text``,
``Llama4ForCausalLM``).

The decoder, in omnifuse's layer kinds:

- attention: ``chunked`` (blocks of ``attention_chunk_size`` aligned to position 0) on the RoPE
  layers, ``full`` without RoPE (NoPE) on the others. ``no_rope_layers[i]`` is 1 where layer i
  *uses* RoPE. The NoPE layers scale their queries by the attention temperature
  (``attn_temperature_tuning``, ``floor_scale``, ``attn_scale``). ``use_qk_norm`` RMS-normalises
  q and k without a weight after RoPE, on the RoPE layers only.
- feed-forward: ``moe`` on the ``moe_layers`` (sigmoid top-k routing that scales the expert's input,
  and a shared expert of the experts' width ``intermediate_size``), dense SwiGLU of
  ``intermediate_size_mlp`` elsewhere.

Llama 4 rotates interleaved pairs (dims 2i, 2i + 1) where omnifuse's RoPE rotates halves (i,
i + D/2). The loader permutes each head's q and k projection rows from one layout to the other.
Attention scores are dot products over the same permutation of q and k, so the output is
unchanged, and so is the weightless norm over a head. The files store the experts fused and
input-major: ``experts.gate_up_proj`` is (E, D, 2I), gate first, and ``experts.down_proj`` is
(E, I, D). The loader cuts them into one SwiGLU per expert.

The reference scales a NoPE query by the temperature of its cache slot; omnifuse scales it by the
token's position. The two agree for every unpadded prompt. In a left-padded batch omnifuse gives
each row what it gets alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import DecoderConfig, LayerSpec, ModelConfig, TextConfig
from omnifuse.interop.hf import (
    KeyMap,
    Mapped,
    Stacked,
    build_on_meta,
    llama_decoder_key_map,
    llama_decoder_kwargs,
    load_mapped,
)

__all__ = ["llama4_decoder_kwargs", "llama4_text_config", "llama4_text_key_map", "load_llama4_text"]


def _layer_list(text: dict[str, Any], name: str, where: str) -> list[int]:
    values = text[name]
    if not isinstance(values, list) or any(not isinstance(v, int) for v in values):
        raise CheckpointError(f"{where}: {name} must be a list of integers, got {values!r}")
    return values


def llama4_decoder_kwargs(text: dict[str, Any], where: str) -> dict[str, Any]:
    """DecoderConfig fields of a HF ``llama4_text`` config (the ``text_config`` of ``llama4``)."""
    kwargs = llama_decoder_kwargs({**text, "intermediate_size": text.get("intermediate_size_mlp", 16384)})
    layers = kwargs["num_layers"]
    chunk = text.get("attention_chunk_size")
    if text.get("no_rope_layers"):
        uses_rope = [bool(v) for v in _layer_list(text, "no_rope_layers", where)]
    else:
        interval = text.get("no_rope_layer_interval", 4)
        uses_rope = [(i + 1) % interval != 0 for i in range(layers)]
    if len(uses_rope) != layers:
        raise CheckpointError(f"{where}: no_rope_layers has {len(uses_rope)} entries for {layers} layers")
    if text.get("layer_types"):
        kinds = text["layer_types"]
        if len(kinds) != layers or any(k not in ("chunked_attention", "full_attention") for k in kinds):
            raise CheckpointError(f"{where}: layer_types must give chunked_attention or full_attention for each "
                                  f"of the {layers} layers, got {kinds!r}")
        chunked = [k == "chunked_attention" for k in kinds]
    else:
        chunked = [bool(chunk) and r for r in uses_rope]
    if any(chunked) and not (isinstance(chunk, int) and chunk > 0):
        raise CheckpointError(f"{where}: chunked attention layers need a positive attention_chunk_size, got {chunk!r}")
    step = text.get("interleave_moe_layer_step", 1)
    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, layers, step)) if step else []
    moe = set(_layer_list({"moe_layers": moe_layers}, "moe_layers", where))
    if any(not 0 <= i < layers for i in moe):
        raise CheckpointError(f"{where}: moe_layers {sorted(moe)} name layers outside 0..{layers - 1}")
    qk_norm = bool(text.get("use_qk_norm", True))
    pattern = tuple(LayerSpec(attention="chunked" if chunked[i] else "full",
                              feed_forward="moe" if i in moe else "dense", rope=uses_rope[i],
                              qk_norm=qk_norm and uses_rope[i]) for i in range(layers))
    experts = text.get("num_local_experts", 16)
    width = text.get("intermediate_size", 8192)
    kwargs.update(layer_pattern=pattern, attention_chunk_size=chunk if any(chunked) else 0)
    if moe:
        kwargs.update(num_experts=experts, experts_per_token=text.get("num_experts_per_tok", 1), router="sigmoid",
                      expert_intermediate_size=width, shared_expert_intermediate_size=width)
    if text.get("attn_temperature_tuning", True):  # the shipped Scout config writes 4 (truthy) for true
        kwargs.update(attn_temperature_floor=int(text.get("floor_scale", 8192)),
                      attn_temperature_scale=float(text.get("attn_scale", 0.1)))
    return kwargs


def llama4_text_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a ``llama4_text`` ``config.json``: text only, no placeholders."""
    decoder = DecoderConfig(**llama4_decoder_kwargs(hf, str(Path(folder) / "config.json")))
    return ModelConfig(name=Path(folder).name, vision=None, decoder=decoder,
                       text=TextConfig(tokenizer="file", placeholder_tokens={}))


def _halves(head_dim: int):
    """Rows of a q/k projection (heads x head_dim, ...) from interleaved RoPE pairs (2i, 2i + 1) to
    halves (i, i + head_dim / 2)."""
    def permute(t: torch.Tensor) -> torch.Tensor:
        rest = t.shape[1:]
        return t.reshape(-1, head_dim // 2, 2, *rest).transpose(1, 2).reshape(t.shape)
    return permute


def llama4_text_key_map(prefix: str, head_dim: int) -> KeyMap:
    """The text model's tensors under ``prefix`` (``model.`` in ``Llama4ForCausalLM``) onto
    omnifuse's ``decoder.*``; ``lm_head`` next to the prefix's parent."""
    p = re.escape(prefix)
    layer = rf"{p}layers\.(\d+)\."
    head = re.escape(prefix[: -len("model.")]) if prefix.endswith("model.") else ""
    return [
        (rf"{layer}self_attn\.(q|k)_proj\.(weight|bias)", Mapped(r"decoder.layers.\1.self_attn.\2_proj.\3",
                                                                _halves(head_dim))),
        (rf"{layer}feed_forward\.experts\.gate_up_proj",
         Stacked((r"decoder.layers.\1.mlp.experts.{e}.gate_proj.weight", r"decoder.layers.\1.mlp.experts.{e}.up_proj.weight"))),
        (rf"{layer}feed_forward\.experts\.down_proj", Stacked((r"decoder.layers.\1.mlp.experts.{e}.down_proj.weight",))),
        (rf"{layer}feed_forward\.(.+)", r"decoder.layers.\1.mlp.\2"),
        (rf"{head}lm_head\.weight", "decoder.lm_head.weight"),
        *llama_decoder_key_map(prefix),
    ]


def load_llama4_text(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = llama4_text_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, llama4_text_key_map("model.", config.decoder.head_dim), device=device).eval()
