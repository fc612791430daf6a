"""Media modalities as a registry: how a model config builds each modality's processor, encoder
and connector.

``MultimodalModel`` builds one of each for every modality whose config section is set
(``ModelConfig.modalities``); nothing else in the model names a modality. Adding one is a config
section, an entry here and its modules (ARCHITECTURE.md, "Adding a modality").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from omnifuse.config import ModelConfig
    from omnifuse.processing.image import ImageProcessor

__all__ = ["MODALITIES", "Modality", "build_audio_encoder", "build_audio_processor", "build_image_processor",
           "build_video_encoder", "build_video_processor", "build_vision_encoder"]


@dataclass(frozen=True)
class Modality:
    """One modality: ``section`` is the ``ModelConfig`` field of its encoder config (``None`` there:
    the model does not take it); the builders make its parts from the whole model config."""

    section: str
    processor: Callable[[ModelConfig], Any]  # source -> media item (processing.media.MediaItem)
    encoder: Callable[[ModelConfig], nn.Module]  # encoder(**item.inputs) -> features
    connector: Callable[[ModelConfig], nn.Module] | None  # features -> (..., tokens, decoder width)
    shares_connector: str | None = None  # no connector of its own: that modality's
    needs: tuple[str, ...] = ()  # modalities whose parts it uses (built even when not taken as input)
    # The (rows, cols) grid an item's encoder features form per crop, for connectors that need it
    # (pixel shuffle, pooling); None: not a grid (audio frames, merged tokens, class tokens).
    feature_grid: Callable[[ModelConfig, Any], tuple[int, int] | None] = lambda config, item: None


# --------------------------------------------------------------------------------------------- image


def build_vision_encoder(config: ModelConfig) -> nn.Module:
    from omnifuse.encoders import VisionTransformer
    from omnifuse.encoders.mllama_vision import MllamaVisionEncoder

    v = config.vision
    if v.type == "mllama":
        return MllamaVisionEncoder(
            image_size=v.image_size, patch_size=v.patch_size, dim=v.hidden_size, num_layers=v.num_layers,
            num_global_layers=v.num_global_layers, num_heads=v.num_heads, hidden=v.intermediate_size,
            intermediate_layers=v.intermediate_layers, max_num_tiles=v.max_num_tiles, num_channels=v.num_channels,
            eps=v.norm_eps, activation=v.activation)
    return VisionTransformer(
        image_size=v.image_size, patch_size=v.patch_size, dim=v.hidden_size, num_layers=v.num_layers,
        num_heads=v.num_heads, hidden=v.intermediate_size, num_channels=v.num_channels, use_cls=v.use_cls,
        activation=v.activation, eps=v.norm_eps, pre_norm=v.pre_norm, patch_bias=v.patch_bias,
        qkv_bias=v.qkv_bias, feature_layers=v.feature_layers, drop_cls=v.feature_select == "default", stem=v.stem,
        merge_tokens=v.merge_tokens, post_norm=v.post_norm, cls_last=v.cls_position == "last",
        rope_theta=v.rope_theta,
    )


def build_image_processor(config: ModelConfig) -> ImageProcessor | None:
    """The image processor of ``config`` (None for a model without a vision encoder). Its token
    counts are the encoder's and connector's output per crop (``connectors.crop_tokens``)."""
    from omnifuse.connectors import crop_tokens
    from omnifuse.processing.image import ImageProcessor

    if config.vision is None:
        return None
    v = config.vision
    return ImageProcessor(config.image, patch_size=v.patch_size, cls_tokens=v.cls_tokens,
                          tiled_encoder=v.type == "mllama",
                          crop_tokens=lambda grid: crop_tokens(config, grid))


def _image_connector(config: ModelConfig) -> nn.Module:
    from omnifuse.connectors import CONNECTORS

    c = config.connector
    return CONNECTORS[c.type].build(c, config.vision.feature_dim, config.decoder.hidden_size,
                                    positions=config.tokens_per_crop if c.position_embedding else 0)


def _image_grid(config: ModelConfig, item) -> tuple[int, int] | None:
    from omnifuse.connectors import encoder_tokens

    return encoder_tokens(config.vision, item.grid)[1]


# --------------------------------------------------------------------------------------------- audio


def build_audio_encoder(config: ModelConfig) -> nn.Module:
    from omnifuse.encoders.audio import PatchAudioEncoder, WhisperEncoder

    a = config.audio
    common = dict(num_mel_bins=a.num_mel_bins, chunk_frames=a.chunk_frames, dim=a.hidden_size,
                  num_layers=a.num_layers, num_heads=a.num_heads, hidden=a.intermediate_size,
                  activation=a.activation, eps=a.norm_eps)
    if a.encoder == "patch":
        return PatchAudioEncoder(**common, patch_mels=a.patch_mels, patch_frames=a.patch_frames)
    return WhisperEncoder(**common, pool=a.pool)


def build_audio_processor(config: ModelConfig):
    from omnifuse.encoders.audio import audio_tokens
    from omnifuse.processing.audio import AudioProcessor

    if config.audio is None:
        return None
    return AudioProcessor(config.audio, lambda frames: audio_tokens(config.audio, frames))


def _audio_connector(config: ModelConfig) -> nn.Module:
    from omnifuse.connectors import CONNECTORS

    return CONNECTORS[config.audio.connector](config.audio.hidden_size, config.decoder.hidden_size)


# --------------------------------------------------------------------------------------------- video


def build_video_encoder(config: ModelConfig) -> nn.Module:
    from omnifuse.encoders.video import VideoEncoder

    v = config.video
    side = config.image.image_size // config.vision.patch_size
    return VideoEncoder(feature_dim=config.vision.feature_dim, max_groups=-(-v.max_frames // v.temporal_patch),
                        temporal_patch=v.temporal_patch, temporal_embedding=v.temporal_embedding,
                        spatial_pool=v.spatial_pool, grid=side if v.spatial_pool > 1 else 0)


def build_video_processor(config: ModelConfig):
    from omnifuse.processing.video import VideoProcessor

    if config.video is None:
        return None
    return VideoProcessor(config.video, build_image_processor(config), video_frame_tokens(config))


def video_frame_tokens(config: ModelConfig) -> int:
    """Tokens of one frame group: the connector's output for a crop's patch grid, spatially
    pooled first."""
    from omnifuse.connectors import CONNECTORS

    if config.video.spatial_pool == 1:
        return config.tokens_per_crop
    grid = _video_grid(config, None)
    return CONNECTORS[config.connector.type].num_output_tokens(config.connector, grid[0] * grid[1], grid)


def _video_grid(config: ModelConfig, item) -> tuple[int, int] | None:
    """A frame's features: the crop's patch grid, pooled ``spatial_pool`` x ``spatial_pool``."""
    from omnifuse.connectors import encoder_tokens

    side = config.image.image_size // config.vision.patch_size
    grid = encoder_tokens(config.vision, (side, side))[1]
    pool = config.video.spatial_pool
    return None if grid is None else (grid[0] // pool, grid[1] // pool)


MODALITIES: dict[str, Modality] = {
    "image": Modality(section="vision", processor=build_image_processor, encoder=build_vision_encoder,
                      connector=_image_connector, feature_grid=_image_grid),
    "audio": Modality(section="audio", processor=build_audio_processor, encoder=build_audio_encoder,
                      connector=_audio_connector),
    # Frames are images: the image encoder (attached, not copied) and the image connector.
    "video": Modality(section="video", processor=build_video_processor, encoder=build_video_encoder,
                      connector=None, shares_connector="image", needs=("image",), feature_grid=_video_grid),
}
