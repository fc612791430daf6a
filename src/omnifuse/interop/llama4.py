"""Llama 4 checkpoints in Hugging Face layout: the text model (``llama4_text``,
``Llama4ForCausalLM``) and the image + text model (``llama4``, ``Llama4ForConditionalGeneration``).

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

The vision tower, in omnifuse's ViT: an unfold patch embedding, a bias-free linear, which is a
convolution's weight reshaped; the class token after the patches, dropped after the post-norm; 2-D
RoPE in every layer, its pairs interleaved like the text model's and permuted the same way. Then
omnifuse's ``pixel_shuffle`` connector (ratio 0.5: scale factor 2, Idefics3's channel order) with
the ``llama4`` projection: the adapter's fc1, GELU, fc2, GELU, then the projector. The image
processor (``Llama4ImageProcessor``): the best-fit canvas of up to ``max_patches`` 336 px tiles
(``tiles`` mode, Mllama's canvas choice), a bilinear resize into it without distortion, zero
padding, and a bilinear global tile when there are several tiles. Pixels are rescaled and
normalised in bfloat16. The prompt's ``<|image|>`` becomes the layout of ``text.image_span llama4``,
and the features go over its ``<|patch|>`` tokens.

The reference scales a NoPE query by the temperature of its cache slot; omnifuse scales it by the
token's position. The two agree for every unpadded prompt. In a left-padded batch omnifuse gives
each row what it gets alone.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import (
    ConnectorConfig,
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    LayerSpec,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from omnifuse.interop.hf import (
    KeyMap,
    Mapped,
    Stacked,
    build_on_meta,
    check_pixel_steps,
    llama_decoder_key_map,
    llama_decoder_kwargs,
    load_mapped,
    per_channel,
    placeholder_text,
    read_image_processor_config,
    warn_processor_defaults,
)

__all__ = ["llama4_config", "llama4_decoder_kwargs", "llama4_key_map", "llama4_text_config", "llama4_text_key_map",
           "load_llama4", "load_llama4_text"]

# transformers' Llama4ImageProcessor class defaults, for keys a saved processor leaves out.
_PROCESSOR_DEFAULTS = dict(resample=2, size={"height": 336, "width": 336}, max_patches=16, resize_to_max_canvas=False,
                           do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
# transformers' Llama4VisionConfig defaults.
_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=34, num_attention_heads=16, num_channels=3,
                        intermediate_size=5632, image_size=448, patch_size=14, pixel_shuffle_ratio=0.5,
                        projector_input_dim=4096, projector_output_dim=4096, vision_output_dim=7680,
                        multi_modal_projector_bias=False, hidden_act="gelu")


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


def _image_config(folder: Path, tile: int) -> ImageConfig:
    pre, source = read_image_processor_config(folder)
    settings = ImageConfig(mode="tiles", image_size=tile, max_tiles=16, overview=True, overview_when="several",
                           overview_resample="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           normalise_dtype="bfloat16")
    if source is None:
        warn_processor_defaults(folder, f"Llama4ImageProcessor's defaults (up to 16 tiles of {tile} px, mean and std 0.5)")
        return settings
    pre = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in pre.items() if v is not None}}
    where = str(folder / source)
    check_pixel_steps(pre, where, "Llama 4", (2, "bilinear"))
    size = pre["size"]
    if not isinstance(size, dict) or not size.get("height") or size.get("height") != size.get("width"):
        raise CheckpointError(f"{where}: size {size} is not supported (square tiles)")
    if pre["resize_to_max_canvas"]:
        raise CheckpointError(f"{where}: resize_to_max_canvas=true is not supported")
    return dataclasses.replace(settings, image_size=int(size["height"]), max_tiles=int(pre["max_patches"]),
                               mean=per_channel(pre["image_mean"], f"{where}: image_mean"),
                               std=per_channel(pre["image_std"], f"{where}: image_std"))


def llama4_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a ``llama4`` ``config.json`` and its image processor settings."""
    folder = Path(folder)
    where = str(folder / "config.json")
    vision = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    text = hf.get("text_config") or {}
    if vision["hidden_act"] != "gelu":
        raise CheckpointError(f"{where}: vision hidden_act {vision['hidden_act']!r} is not supported (gelu)")
    ratio = float(vision["pixel_shuffle_ratio"])
    if abs(1 / ratio - round(1 / ratio)) > 1e-9:
        raise CheckpointError(f"{where}: pixel_shuffle_ratio {ratio} is not 1 / an integer")
    scale = round(1 / ratio)
    hidden, width = vision["hidden_size"], int(vision["projector_input_dim"])
    if vision["intermediate_size"] != hidden * scale * scale or vision["projector_output_dim"] != width \
            or vision["vision_output_dim"] != width:
        raise CheckpointError(f"{where}: the adapter needs intermediate_size = hidden_size x {scale * scale} "
                              f"({hidden * scale * scale}) and projector_input_dim = projector_output_dim = "
                              f"vision_output_dim, got {vision['intermediate_size']}, {vision['projector_input_dim']}, "
                              f"{vision['projector_output_dim']}, {vision['vision_output_dim']}")
    rope = vision.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", vision.get("rope_theta", 10000.0)))
    image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 200092)))
    return ModelConfig(
        name=folder.name,
        vision=VisionConfig(image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=hidden,
                            num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                            intermediate_size=vision["intermediate_size"], num_channels=vision["num_channels"],
                            use_cls=True, cls_position="last", activation="gelu", pre_norm=True, post_norm=True,
                            patch_bias=False, qkv_bias=True, feature_layer=-1, feature_select="default",
                            rope_theta=theta),
        image=_image_config(folder, vision["image_size"]),
        connector=ConnectorConfig(type="pixel_shuffle", scale_factor=scale, projection="llama4", hidden_size=width,
                                  bias=bool(vision.get("multi_modal_projector_bias", False))),
        fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(**llama4_decoder_kwargs(text, where)),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": placeholder_text(folder, image_token_id, "<|patch|>")},
                        placeholder_ids={"image": image_token_id}, image_span="llama4", prompt_image_token="<|image|>"),
    )


def llama4_key_map(config: ModelConfig) -> KeyMap:
    v = config.vision
    vit = r"vision_model\.model\.layers\.(\d+)\."
    return [
        (r"vision_model\.patch_embedding\.linear\.weight",  # unfold's (C, kh, kw) order is the convolution's
         Mapped("encoders.image.patch_embedding.weight", lambda t: t.reshape(t.shape[0], v.num_channels, v.patch_size,
                                                                               v.patch_size))),
        (r"vision_model\.class_embedding", "encoders.image.class_embedding"),
        (r"vision_model\.positional_embedding_vlm", "encoders.image.position_embedding"),  # class token's row last
        (r"vision_model\.layernorm_pre\.(weight|bias)", r"encoders.image.pre_layernorm.\1"),
        (r"vision_model\.layernorm_post\.(weight|bias)", r"encoders.image.post_layernorm.\1"),
        (rf"{vit}self_attn\.(q|k)_proj\.(weight|bias)",
         Mapped(r"encoders.image.layers.\1.self_attn.\2_proj.\3", _halves(v.hidden_size // v.num_heads))),
        (rf"{vit}self_attn\.(v|o)_proj\.(weight|bias)", r"encoders.image.layers.\1.self_attn.\2_proj.\3"),
        (rf"{vit}input_layernorm\.(weight|bias)", r"encoders.image.layers.\1.layer_norm1.\2"),
        (rf"{vit}post_attention_layernorm\.(weight|bias)", r"encoders.image.layers.\1.layer_norm2.\2"),
        (rf"{vit}mlp\.(fc[12]\.(?:weight|bias))", r"encoders.image.layers.\1.mlp.\2"),
        (r"vision_model\.vision_adapter\.mlp\.fc1\.(weight|bias)", r"connectors.image.proj.0.\1"),
        (r"vision_model\.vision_adapter\.mlp\.fc2\.(weight|bias)", r"connectors.image.proj.2.\1"),
        (r"multi_modal_projector\.linear_1\.(weight|bias)", r"connectors.image.proj.4.\1"),
        *llama4_text_key_map("language_model.model.", config.decoder.head_dim),
    ]


def load_llama4(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = llama4_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, llama4_key_map(config), device=device).eval()
