"""Cost figures of an omnifuse model config. ``omnifuse info``, ``omnifuse plan`` (presets and
config files), the pipeline's ``GenerationResult`` and the arena all take them from here.

Parameters are counted on the model built on the meta device, so a 7B or 11B config costs no
memory. Cache bytes follow one formula, ``arch.cache_bytes`` on the config's ``DecoderArch``: keys
and values, ``num_kv_heads * head_dim`` each at the cache dtype, for every self-attention layer and
context position, and for every cross-attention layer and media state.

Cross-attention models have two state counts per image. They are named apart everywhere:

- ``cross_attention_states_prefill``: the states the encoder produces. Every cross-attention layer
  turns them into K/V at prefill. Llama 3.2 Vision pads every image to ``max_num_tiles`` tiles and
  encodes and caches the padding too, so any image gives 4 x 1601 = 6404.
- ``cross_attention_states_decode``: the states decode tokens attend to, which are the real tiles'
  states of the images the last prompt token reads. The model keeps only these in its decode cache
  (1601 for a one-tile image).

Early fusion puts every visual token in the context, so both counts are 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnifuse.config import ModelConfig
from omnifuse.planner.arch import CacheBytes, cache_bytes, from_model_config

__all__ = [
    "AudioCost",
    "CacheBytes",
    "ImageCost",
    "RequestCost",
    "VideoCost",
    "active_parameters",
    "audio_cost",
    "audio_encoder_flops",
    "bounded_kv_bytes",
    "count_parameters",
    "cross_kv_bytes_per_state",
    "image_cost",
    "images_seen_at_decode",
    "item_cost",
    "kv_bytes_per_token",
    "model_info",
    "request_cost",
    "video_cost",
    "video_encoder_flops",
]


def _fusion(config: ModelConfig):
    from omnifuse.fusion.strategy import fusion_strategy

    return fusion_strategy(config.fusion)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters per component (tied weights counted once), without allocating them."""
    from omnifuse.model import build_model

    with torch.device("meta"):
        model = build_model(config)
    def n(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    counts = {"vision_encoder": n(model.vision_encoder), "connector": n(model.connectors),
              "cross_attention": n(model.cross_layers)}
    for modality in ("audio", "video"):  # the video encoder's own: its temporal embedding (frames use the vision encoder)
        if modality in model.encoders:
            counts[f"{modality}_encoder"] = n(model.encoders[modality])
    media = sum(counts.values())
    counts["total"] = n(model)
    counts["decoder"] = counts["total"] - media  # what is left: embeddings, layers, head
    return counts


def active_parameters(config: ModelConfig, total: int | None = None) -> int:
    """What one token runs through: the total less the routed experts a mixture-of-experts layer
    does not send it to. ``total``: ``count_parameters(config)["total"]`` when already counted."""
    total = count_parameters(config)["total"] if total is None else total
    return total - from_model_config(config).decoder.inactive_parameters()


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: float = 4) -> int:
    """Self-attention K/V of one more context position: every layer that keeps the whole context
    (a bounded layer's ring stops growing at its span: ``bounded_kv_bytes``)."""
    d = from_model_config(config).decoder
    return int(d.slot_bytes(dtype_bytes) * d.full_layers)


def bounded_kv_bytes(config: ModelConfig, dtype_bytes: float = 4) -> int:
    """The bounded (sliding, chunked, infini) layers' caches once the context reaches their spans:
    their rings, and Infini-attention's memory."""
    d = from_model_config(config).decoder
    bounded = [(kind, span) for kind, span in d.attention_kinds() if kind != "full"]
    return int(d.slot_bytes(dtype_bytes) * sum(span for _, span in bounded)
               + d.memory_bytes * sum(kind == "infini" for kind, _ in bounded))


def cross_kv_bytes_per_state(config: ModelConfig, dtype_bytes: float = 4) -> int:
    """Cross-attention K/V of one media state, all cross-attention layers (0 for early fusion)."""
    return cache_bytes(from_model_config(config).decoder, 0, 1, 0, dtype_bytes).cross_attention_prefill


@dataclass(frozen=True)
class ImageCost:
    """What one ``width x height`` image costs a model (the size after EXIF transpose)."""

    width: int
    height: int
    crops: int  # crops the encoder runs, padding tiles included
    patch_grid: tuple[int, int]  # (rows, cols) of patches per crop
    tile_canvas: tuple[int, int]  # (rows, cols) of tiles in "tiles" mode, else (1, 1)
    visual_tokens: int  # states the encoder and connector produce (ImageProcessor.num_tokens)
    context_tokens: int  # positions the image takes in the decoder's context
    cross_attention_states_prefill: int
    cross_attention_states_decode: int

    @property
    def media_tokens(self) -> int:
        return self.visual_tokens


@dataclass(frozen=True)
class AudioCost:
    """What one clip of ``num_samples`` samples at the model's rate costs a model."""

    seconds: float
    chunks: int  # chunks the encoder runs (audio.chunk_seconds each, the last one padded)
    media_tokens: int  # tokens the encoder and connector keep (AudioProcessor.num_tokens)
    context_tokens: int
    cross_attention_states_prefill: int
    cross_attention_states_decode: int


def audio_cost(config: ModelConfig, num_samples: int, processor=None) -> AudioCost:
    """``processor``: the config's audio processor, if one is built already."""
    if processor is None:
        from omnifuse.modalities import build_audio_processor

        processor = build_audio_processor(config)
    n = processor.num_tokens_for_samples(num_samples)
    fusion = _fusion(config)
    a = config.audio
    return AudioCost(seconds=num_samples / a.sampling_rate, chunks=-(-num_samples // a.chunk_samples),
                     media_tokens=n, context_tokens=fusion.context_tokens(n),
                     cross_attention_states_prefill=fusion.cross_states(n),
                     cross_attention_states_decode=fusion.cross_states(n))


@dataclass(frozen=True)
class VideoCost:
    """What a ``seconds``-long ``width x height`` video sampled at ``fps`` costs a model."""

    seconds: float
    fps: float
    frames: int  # frames taken (processing/video.py's sampling contract)
    media_tokens: int
    context_tokens: int
    cross_attention_states_prefill: int
    cross_attention_states_decode: int


def video_cost(config: ModelConfig, seconds: float, width: int, height: int, fps: float | None = None,
               processor=None) -> VideoCost:
    """``processor``: the config's video processor, if one is built already."""
    if processor is None:
        from omnifuse.modalities import build_video_processor

        processor = build_video_processor(config)
    fps = fps or config.video.fps
    n = processor.num_tokens(seconds, width, height, fps)
    fusion = _fusion(config)
    return VideoCost(seconds=seconds, fps=fps, frames=processor.num_frames(seconds, fps), media_tokens=n,
                     context_tokens=fusion.context_tokens(n), cross_attention_states_prefill=fusion.cross_states(n),
                     cross_attention_states_decode=fusion.cross_states(n))


def _connector_flops(kind: str, positions: int, d_in: int, d_out: int) -> int:
    if kind == "mlp":
        return 2 * positions * (d_in * d_out + d_out * d_out)
    return 2 * positions * d_in * d_out  # linear


def audio_encoder_flops(config: ModelConfig, num_samples: int) -> int:
    """FLOPs of the audio encoder and its connector on a clip (every chunk, padding included: it
    is computed, then dropped), counted as torch's FLOP counter counts them (matmuls, convolutions,
    attention)."""
    a = config.audio
    chunks = max(1, -(-num_samples // a.chunk_samples))
    d, f = a.hidden_size, a.chunk_frames
    if a.encoder == "patch":
        n = (f // a.patch_frames) * (a.num_mel_bins // a.patch_mels)
        stem = 2 * n * a.patch_mels * a.patch_frames * d
        out = n
    else:
        n = (f - 1) // 2 + 1
        stem = 2 * a.num_mel_bins * 3 * d * f + 2 * d * 3 * d * n
        out = n if a.pool == 1 else n // a.pool
    layers = a.num_layers * (n * (2 * 4 * d * d + 2 * 2 * d * a.intermediate_size) + 4 * d * n * n)
    return chunks * (stem + layers + _connector_flops(a.connector, out, d, config.decoder.hidden_size))


def video_encoder_flops(config: ModelConfig, frames: int) -> int:
    """FLOPs of a video of ``frames`` frames: each frame (the last repeated to fill a temporal
    patch) through the vision encoder, the temporal merge, the image connector."""
    from omnifuse.connectors import encoder_tokens

    arch = from_model_config(config)
    v = config.video
    groups = -(-frames // v.temporal_patch)
    side = config.image.image_size // config.vision.patch_size
    # a frame's features after spatial pooling (no FLOPs counted for the pooling itself)
    per_crop = encoder_tokens(config.vision, (side, side))[0] // v.spatial_pool ** 2
    flops = arch.encoder.flops(groups * v.temporal_patch)
    if v.temporal_patch > 1:
        dv = config.vision.feature_dim
        flops += 2 * groups * per_crop * v.temporal_patch * dv * dv
    return flops + arch.connector.flops(groups * per_crop, groups)


def image_cost(config: ModelConfig, width: int, height: int, processor=None) -> ImageCost:
    """``processor``: the config's image processor, if one is built already."""
    if processor is None:
        from omnifuse.modalities import build_image_processor

        processor = build_image_processor(config)
    crops, grid, canvas = processor.layout(width, height)
    n = processor.num_tokens(width, height)
    fusion = _fusion(config)
    context = fusion.context_tokens(n)
    if config.text.image_span:  # the marker tokens around the image's tokens (or its one cross-attention placeholder)
        from omnifuse.processing.prompt import MediaShape, span_marker_tokens

        context += span_marker_tokens(config.text.image_span, MediaShape(n, canvas))
    return ImageCost(width=width, height=height, crops=crops, patch_grid=grid, tile_canvas=canvas, visual_tokens=n,
                     context_tokens=context, cross_attention_states_prefill=fusion.cross_states(n),
                     cross_attention_states_decode=fusion.cross_states(processor.num_attended_tokens(width, height)))


def images_seen_at_decode(config: ModelConfig, prompt_ids: Sequence[int], placeholder_id: int | Sequence[int],
                          num_images: int) -> list[bool]:
    """Which of the prompt's media items (in prompt order; ``placeholder_id``: the placeholder ids
    of every modality) the last prompt token attends to. Decode tokens attend to the same ones. The
    model's own rule is ``visible_images``: every item before it, or only the latest placeholder
    group for Llama 3.2 Vision's ``latest`` span."""
    if not num_images:
        return []
    from omnifuse.fusion import visible_images

    ids = [placeholder_id] if isinstance(placeholder_id, int) else list(placeholder_id)
    placeholders = torch.isin(torch.tensor([list(prompt_ids)]), torch.tensor(ids))  # (1, T)
    seen = visible_images(placeholders, num_images, config.fusion.cross_attention_span)[0, -1]  # (N,)
    return [bool(s) for s in seen]


@dataclass(frozen=True)
class RequestCost:
    visual_tokens: int  # all images: tokens in the context (early) or states encoded at prefill (cross)
    cross_attention_states_prefill: int
    cross_attention_states_decode: int
    kv_cache_bytes: CacheBytes
    media_tokens: int = 0  # all media, images included


def item_cost(config: ModelConfig, item, processors: Mapping) -> ImageCost | AudioCost | VideoCost:
    """The cost of one processed media item (an image, audio clip or video) of ``config``'s model,
    by the model's own ``processors`` ({modality: processor})."""
    if item.modality == "image":
        return image_cost(config, *item.original_size, processors["image"])
    if item.modality == "video":
        return video_cost(config, item.duration, *item.size, item.fps, processors["video"])
    return audio_cost(config, item.num_samples, processors["audio"])


def request_cost(config: ModelConfig, sequence_tokens: int, images: Sequence[ImageCost | AudioCost | VideoCost] = (),
                 dtype_bytes: float = 4, seen: Sequence[bool] | None = None) -> RequestCost:
    """One request: ``sequence_tokens`` context positions (prompt and output, media tokens
    included for early fusion) and its media items, in prompt order. ``seen``: the items the last
    prompt token attends to (``images_seen_at_decode``). None means all of them, which holds when
    they sit together before the text, as the pipeline places them in a prompt without placeholders."""
    seen = [True] * len(images) if seen is None else list(seen)
    if len(seen) != len(images):
        raise ValueError(f"seen names {len(seen)} images but the request has {len(images)}")
    prefill = sum(i.cross_attention_states_prefill for i in images)
    decode = sum(i.cross_attention_states_decode for i, s in zip(images, seen) if s)
    return RequestCost(visual_tokens=sum(i.media_tokens for i in images if isinstance(i, ImageCost)),
                       media_tokens=sum(i.media_tokens for i in images), cross_attention_states_prefill=prefill,
                       cross_attention_states_decode=decode,
                       kv_cache_bytes=cache_bytes(from_model_config(config).decoder, sequence_tokens, prefill, decode,
                                                  dtype_bytes))


def model_info(config: ModelConfig, dtype_bytes: int = 4, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """``omnifuse info``: parameters, and what one image costs. ``image_size`` is (width, height);
    the default is the model's crop size, square."""
    info: dict[str, Any] = {"name": config.name, "fusion": config.fusion.type, "parameters": count_parameters(config)}
    if config.vision is not None:
        w, h = image_size or (config.image.image_size, config.image.image_size)
        cost = image_cost(config, w, h)
        info.update(image_mode=config.image.mode, image_size=[w, h], crops=cost.crops)
        if config.image.mode == "tiles":
            info["tile_canvas"] = {"rows": cost.tile_canvas[0], "cols": cost.tile_canvas[1]}
        info.update(visual_tokens_per_image=cost.visual_tokens, context_tokens_per_image=cost.context_tokens)
    if config.audio is not None:
        a = config.audio
        second, chunk = audio_cost(config, a.sampling_rate), audio_cost(config, a.chunk_samples)
        info.update(audio_sampling_rate=a.sampling_rate, audio_tokens_per_second=second.media_tokens,
                    audio_chunk_seconds=a.chunk_seconds, audio_tokens_per_chunk=chunk.media_tokens,
                    audio_max_seconds=a.max_seconds)
    if config.video is not None:
        v, side = config.video, config.image.image_size
        group = video_cost(config, v.temporal_patch / v.fps, side, side)  # one group of frames
        info.update(video_fps=v.fps, video_max_frames=v.max_frames, video_temporal_patch=v.temporal_patch,
                    video_tokens_per_frame=group.media_tokens / v.temporal_patch,
                    video_tokens_per_second=video_cost(config, 1.0, side, side).media_tokens)
    info.update(context_length=config.decoder.max_position, cache_dtype_bytes=dtype_bytes,
                kv_cache_bytes_per_token=kv_bytes_per_token(config, dtype_bytes))
    kinds = from_model_config(config).decoder.attention_kinds()
    if any(kind != "full" for kind, _ in kinds):
        names = [kind for kind, _ in kinds]
        info.update(attention_layers={k: names.count(k) for k in dict.fromkeys(names)},
                    attention_spans={kind: span for kind, span in kinds if kind != "full"},
                    kv_cache_bytes_bounded_layers=bounded_kv_bytes(config, dtype_bytes))
    if config.vision is None:
        return info
    if not _fusion(config).in_sequence:
        per_state = cross_kv_bytes_per_state(config, dtype_bytes)
        info.update(cross_attention_layers=list(config.cross_layers), cross_attention_kv_bytes_per_state=per_state,
                    cross_attention_states_prefill=cost.cross_attention_states_prefill,
                    cross_attention_states_decode=cost.cross_attention_states_decode,
                    cross_attention_kv_bytes_prefill=cost.cross_attention_states_prefill * per_state,
                    cross_attention_kv_bytes_decode=cost.cross_attention_states_decode * per_state)
    else:
        info["kv_cache_bytes_per_image"] = cost.context_tokens * kv_bytes_per_token(config, dtype_bytes)
    return info
