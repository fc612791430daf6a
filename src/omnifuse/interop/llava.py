"""LLaVA / LLaVA-1.5 checkpoints in Hugging Face layout (``LlavaForConditionalGeneration``).

CLIP vision tower -> hidden state(s) at ``vision_feature_layer`` (CLS dropped for the "default"
strategy) -> 2-layer GELU projector -> Llama decoder, image features written over the expanded
``<image>`` tokens. Both key layouts of published checkpoints load: ``language_model.model.*`` /
``vision_tower.vision_model.*`` (transformers < 4.52 and re-saved checkpoints) and
``model.language_model.*`` / ``model.vision_tower.*`` (newer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import (
    CLIP_MEAN,
    CLIP_STD,
    ConnectorConfig,
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from omnifuse.interop.hf import (
    KeyMap,
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

__all__ = ["llava_config", "llava_key_map", "load_llava", "normalise_llava_key"]

# transformers' CLIPVisionConfig defaults, for keys a saved config leaves out.
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


# transformers' CLIPImageProcessor / LlavaImageProcessor class defaults, for keys a saved processor
# leaves out (what the reference itself then uses).
_PROCESSOR_DEFAULTS = dict(resample=3, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                           do_resize=True, do_center_crop=True, do_pad=False, do_rescale=True, rescale_factor=1 / 255,
                           do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def _image_config(folder: Path, image_size: int, section: str = "image_processor") -> ImageConfig:
    """The reference image processor's settings (``processor_config.json``'s ``section``, or
    ``preprocessor_config.json``) as an ImageConfig; a folder with neither gets LLaVA-1.5's CLIP
    processing at the vision tower's resolution, with a warning."""
    pre, source = read_image_processor_config(folder, section)
    if source is None:
        warn_processor_defaults(folder, f"CLIP defaults (shortest edge {image_size} + centre crop, "
                                        f"mean {CLIP_MEAN}, std {CLIP_STD})")
        return ImageConfig(mode="fixed", image_size=image_size, resize="crop")
    pre = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in pre.items() if v is not None}}
    where = f"{folder / source}"
    check_pixel_steps(pre, where, "LLaVA", (3, "bicubic"))
    size, crop = pre["size"], pre["crop_size"]
    if isinstance(size, dict) and "shortest_edge" in size:
        side = int(size["shortest_edge"])  # the short side (a padded square: both sides)
    elif isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        side = int(size["height"])  # a stretch to a square
    else:
        raise CheckpointError(f"{where}: size {size} is not supported (a shortest_edge or a square)")
    stretch = "shortest_edge" not in size
    mode = "pad" if pre["do_pad"] else "resize" if stretch else "crop"
    if pre["do_center_crop"]:
        crop_side = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        if (isinstance(crop, dict) and crop.get("width", crop_side) != crop_side) or crop_side != side:
            raise CheckpointError(f"{where}: resizes to {side} but crops {crop}; only a crop of the same "
                                  "square size is supported")
    elif mode == "crop":
        raise CheckpointError(f"{where}: a shortest_edge resize without do_center_crop or do_pad keeps the "
                              "aspect ratio, which LLaVA's fixed-size vision tower cannot take")
    if side != image_size:
        raise CheckpointError(f"{where}: images become {side} x {side} but the vision tower takes "
                              f"{image_size} x {image_size}")
    return ImageConfig(mode="fixed", image_size=side, resize=mode, mean=per_channel(pre["image_mean"], f"{where}: image_mean"),
                       std=per_channel(pre["image_std"], f"{where}: image_std"))


def llava_config(hf: dict[str, Any], folder: str | Path, processor_section: str = "image_processor") -> ModelConfig:
    """The omnifuse config of a LLaVA ``config.json`` (its image token id among the placeholders)."""
    folder = Path(folder)
    vision = {**_CLIP_DEFAULTS, **(hf.get("vision_config") or {})}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"LLaVA vision tower {vision['model_type']!r} is not supported (supported: clip_vision_model)")
    text = hf.get("text_config") or {}
    if text.get("model_type", "llama") not in ("llama", "mistral") or text.get("sliding_window"):
        raise CheckpointError(f"LLaVA language model {text.get('model_type')!r} is not supported (supported: llama)")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"projector_hidden_act {hf['projector_hidden_act']!r} is not supported (gelu)")
    layer = hf.get("vision_feature_layer", -2)
    strategy = hf.get("vision_feature_select_strategy", "default")
    image_token_id = int(hf.get("image_token_id", hf.get("image_token_index", 32000)))
    config = ModelConfig(
        name=str(folder.name),
        vision=VisionConfig(
            image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=vision["hidden_size"],
            num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
            intermediate_size=vision["intermediate_size"], num_channels=vision["num_channels"], use_cls=True,
            activation=vision["hidden_act"], norm_eps=float(vision["layer_norm_eps"]), pre_norm=True,
            patch_bias=False, qkv_bias=True, feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
            feature_select=strategy,
        ),
        image=_image_config(folder, vision["image_size"], processor_section),
        connector=ConnectorConfig(type="mlp", bias=bool(hf.get("multimodal_projector_bias", True))),
        fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(**llama_decoder_kwargs(text)),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": placeholder_text(folder, image_token_id)},
                        placeholder_ids={"image": image_token_id}),
    )
    return config


def normalise_llava_key(key: str) -> str:
    key = re.sub(r"^model\.(vision_tower|language_model|multi_modal_projector)\.", r"\1.", key)
    key = key.replace("vision_tower.vision_model.", "vision_tower.")
    key = re.sub(r"^language_model\.model\.", "language_model.", key)
    return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)


def llava_key_map(layers_used: int) -> KeyMap:
    used = "|".join(str(i) for i in range(layers_used)) or "-"
    return [
        (r"vision_tower\.embeddings\.class_embedding", "encoders.image.class_embedding"),
        (r"vision_tower\.embeddings\.patch_embedding\.weight", "encoders.image.patch_embedding.weight"),
        (r"vision_tower\.embeddings\.position_embedding\.weight", "encoders.image.position_embedding"),
        (r"vision_tower\.embeddings\.position_ids", None),
        (r"vision_tower\.pre_layrnorm\.(weight|bias)", r"encoders.image.pre_layernorm.\1"),
        (rf"vision_tower\.encoder\.layers\.({used})\.self_attn\.out_proj\.(weight|bias)",
         r"encoders.image.layers.\1.self_attn.o_proj.\2"),
        (rf"vision_tower\.encoder\.layers\.({used})\.(.+)", r"encoders.image.layers.\1.\2"),
        # Layers after the deepest feature layer, and the pooled-output norm, never reach LLaVA's features.
        (r"vision_tower\.encoder\.layers\.\d+\..+", None),
        (r"vision_tower\.post_layernorm\.(weight|bias)", None),
        (r"multi_modal_projector\.(linear_[12]\.(?:weight|bias))", r"connectors.image.\1"),
        *llama_decoder_key_map("language_model."),
    ]


def load_llava(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = llava_config(hf, folder)
    model = build_on_meta(config)
    model = load_mapped(model, folder, llava_key_map(model.vision_encoder.num_layers_used), normalise_llava_key, device=device)
    return model.eval()
