"""LLaVA-NeXT-Video checkpoints in Hugging Face layout (``LlavaNextVideoForConditionalGeneration``),
for video.

Each frame through the CLIP vision tower (the hidden state at ``vision_feature_layer``, CLS dropped
for the "default" strategy), its patch grid average-pooled by ``spatial_pool_stride`` (2), the
2-layer GELU projector, a Llama decoder; the ``<video>`` placeholder expands to frames x pooled
patches. That is omnifuse's ``video`` section with ``spatial_pool`` and no temporal embedding,
early fusion. Frames are processed with the saved video processor's settings
(``processor_config.json``'s ``video_processor``): CLIP's resize of the shortest edge, centre crop,
normalisation.

Not read: the image path (anyres tiling with ``image_newline``), so the model takes video and text
only; images are refused by name. Where the frames come from also differs: transformers'
processor takes the frames it is given (its examples sample them uniformly over the clip), while
omnifuse samples a file by its own contract (``k / fps``, the frame on screen then).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import ModelConfig, TextConfig, VideoConfig
from omnifuse.interop.hf import KeyMap, build_on_meta, load_mapped, placeholder_text
from omnifuse.interop.llava import llava_config, llava_key_map, normalise_llava_key

__all__ = ["llava_next_video_config", "load_llava_next_video"]


def llava_next_video_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a LLaVA-NeXT-Video ``config.json`` (video input only)."""
    folder = Path(folder)
    if hf.get("spatial_pool_mode", "average") != "average":
        raise CheckpointError(f"{folder / 'config.json'}: spatial_pool_mode {hf['spatial_pool_mode']!r} is not "
                              "supported (average)")
    base = llava_config(hf, folder, processor_section="video_processor")
    stride = int(hf.get("spatial_pool_stride", 2))
    side = base.image.image_size // base.vision.patch_size
    if side % stride:
        raise CheckpointError(f"{folder / 'config.json'}: spatial_pool_stride {stride} does not divide the "
                              f"{side} x {side} patch grid")
    video_id = int(hf.get("video_token_index", hf.get("video_token_id", 32000)))
    return dataclasses.replace(
        base, video=VideoConfig(fps=1.0, max_frames=64, temporal_embedding=False, spatial_pool=stride),
        inputs=("video",),
        text=TextConfig(tokenizer="file", placeholder_tokens={"video": placeholder_text(folder, video_id, "<video>")},
                        placeholder_ids={"video": video_id}))


def llava_next_video_key_map(layers_used: int) -> KeyMap:
    return [(r"image_newline", None),  # the anyres image path, not read
            *llava_key_map(layers_used)]


def load_llava_next_video(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = llava_next_video_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, llava_next_video_key_map(model.vision_encoder.num_layers_used),
                       lambda k: normalise_llava_key(k.replace("model.image_newline", "image_newline")),
                       device=device).eval()
