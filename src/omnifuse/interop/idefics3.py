"""Idefics3 and SmolVLM checkpoints in Hugging Face layout (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``: one architecture under two names).

SigLIP vision tower (no class token, post-norm) over every crop -> pixel shuffle by
``scale_factor`` -> a bias-free linear projection -> Llama decoder, the features written over the
``<image>`` tokens. The processor resizes the longest side to ``size.longest_edge``, splits the
image into ``max_image_size`` tiles plus the whole image squeezed to one tile (``image.mode:
split``), and frames each crop's tokens with marker tokens (``text.image_span: idefics3``).
Keys: ``model.vision_model.*``, ``model.connector.modality_projection.proj``,
``model.text_model.*``, ``lm_head``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import (
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
    read_json_if_present,
    siglip_vision_key_map,
    siglip_vision_kwargs,
    warn_processor_defaults,
)

__all__ = ["idefics3_config", "idefics3_key_map", "load_idefics3"]

# transformers' Idefics3ImageProcessor / SmolVLMImageProcessor class defaults, for keys a saved
# processor leaves out. resample 1 is Lanczos, the only filter the split mode implements.
_PROCESSOR_DEFAULTS = dict(resample=1, size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364},
                           do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                           do_image_splitting=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
_DEFAULT_IMAGE_TOKEN_ID = 128257  # both configs' default


def _longest_edge(value: Any, where: str, name: str) -> int:
    if isinstance(value, dict) and isinstance(value.get("longest_edge"), int) and value["longest_edge"] > 0:
        return int(value["longest_edge"])
    raise CheckpointError(f"{where}: {name} {value!r} is not supported (a {{\"longest_edge\": N}})")


def _image_config(folder: Path, tile: int) -> tuple[ImageConfig, int | None]:
    """(the processor's split settings as an ImageConfig, its saved ``image_seq_len`` if any)."""
    pre, source = read_image_processor_config(folder)
    seq_len = read_json_if_present(folder / "processor_config.json").get("image_seq_len")
    if source is None:
        warn_processor_defaults(folder, f"Idefics3 defaults (longest edge {4 * tile}, {tile} px tiles plus "
                                        "the whole image, mean 0.5, std 0.5)")
        return ImageConfig(mode="split", image_size=tile, longest_edge=4 * tile, mean=(0.5,) * 3, std=(0.5,) * 3), seq_len
    pre = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in pre.items() if v is not None}}
    where = f"{folder / source}"
    check_pixel_steps(pre, where, "Idefics3", (1, "Lanczos"))
    if not pre["do_image_splitting"]:
        raise CheckpointError(f"{where}: do_image_splitting=false (one squeezed crop) is not supported; "
                              "omnifuse implements the split processing Idefics3 and SmolVLM ship with")
    side = _longest_edge(pre["max_image_size"], where, "max_image_size")
    longest = _longest_edge(pre["size"], where, "size")
    if side != tile:
        raise CheckpointError(f"{where}: tiles are {side} px but the vision tower takes {tile} x {tile}")
    if longest % side:
        raise CheckpointError(f"{where}: size.longest_edge {longest} is not a multiple of the {side} px tile")
    return ImageConfig(mode="split", image_size=side, longest_edge=longest,
                       mean=per_channel(pre["image_mean"], f"{where}: image_mean"),
                       std=per_channel(pre["image_std"], f"{where}: image_std")), seq_len


def idefics3_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of an Idefics3 or SmolVLM ``config.json`` and its processor files."""
    folder = Path(folder)
    where = str(folder / "config.json")
    text = hf.get("text_config") or {}
    if text.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: language model {text.get('model_type')!r} is not supported (supported: llama)")
    vision = VisionConfig(**siglip_vision_kwargs(hf.get("vision_config") or {}, where))
    scale = int(hf.get("scale_factor", 2))
    side = vision.image_size // vision.patch_size
    if scale < 1 or side % scale:
        raise CheckpointError(f"{where}: scale_factor {scale} does not divide the {side} x {side} patch grid")
    image, seq_len = _image_config(folder, vision.image_size)
    tokens = (side // scale) ** 2
    if seq_len is not None and int(seq_len) != tokens:
        raise CheckpointError(f"{folder / 'processor_config.json'}: image_seq_len {seq_len} but the model makes "
                              f"{tokens} tokens per crop (({side} / {scale})^2)")
    image_token_id = int(hf.get("image_token_id", _DEFAULT_IMAGE_TOKEN_ID))
    text = {"rms_norm_eps": 1e-5, **text}  # both configs' text default
    return ModelConfig(
        name=str(folder.name),
        vision=vision,
        image=image,
        connector=ConnectorConfig(type="pixel_shuffle", scale_factor=scale, bias=False),
        fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(**llama_decoder_kwargs(text)),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": placeholder_text(folder, image_token_id)},
                        placeholder_ids={"image": image_token_id}, image_span="idefics3"),
    )


def idefics3_key_map() -> KeyMap:
    return [
        *siglip_vision_key_map("model.vision_model."),
        (r"model\.connector\.modality_projection\.proj\.weight", "connectors.image.proj.weight"),
        *llama_decoder_key_map("model.text_model."),
    ]


def load_idefics3(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = idefics3_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, idefics3_key_map(), device=device).eval()
