"""The multimodal model: vision encoder -> connector -> fusion (early or cross) -> decoder."""

from __future__ import annotations


import torch
from torch import nn

from omnifuse.config import ModelConfig
from omnifuse.connectors import CONNECTORS
from omnifuse.decoder import TextDecoder, build_decoder
from omnifuse.encoders import VisionTransformer
from omnifuse.encoders.mllama_vision import MllamaVisionEncoder
from omnifuse.fusion import FeatureCountError
from omnifuse.fusion.strategy import fusion_strategy
from omnifuse.inference.cache import InferenceCache
from omnifuse.processing.image import ImageProcessor, ProcessedImage, aspect_ratio_id

__all__ = ["MultimodalModel", "build_image_processor", "build_model", "build_vision_encoder", "ensure_model_fits"]


def build_image_processor(config: ModelConfig) -> ImageProcessor | None:
    if config.vision is None:
        return None
    return ImageProcessor(config.image, patch_size=config.vision.patch_size, cls_tokens=config.vision.cls_tokens)


class MultimodalModel(nn.Module):
    """A vision-language model with early or cross-attention fusion.

    ``forward(input_ids, attention_mask, images, cache)`` returns logits. ``images`` is one list per
    row of processed images, in prompt order. Early fusion needs each image's placeholder token
    repeated ``num_tokens`` times in ``input_ids``; cross fusion needs one placeholder per image,
    placed where the text that may look at the image begins.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        v, d = config.vision, config.decoder
        self.vision_encoder = build_vision_encoder(config) if v is not None else None
        self.connector = CONNECTORS[config.connector.type](
            v.feature_dim, d.hidden_size, bias=config.connector.bias,
            positions=config.tokens_per_crop if config.connector.position_embedding else 0) if v is not None else None
        # Registered after the encoder and connector: parameter order (which a saved optimizer
        # state follows) is the same as before the decoder was a module of its own.
        self.decoder: TextDecoder = build_decoder(config)
        self.image_processor = build_image_processor(config) if v is not None else None
        self.fusion = fusion_strategy(config.fusion)
        self.placeholder_id: int | None = None  # set by the pipeline from the tokenizer
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and name.startswith("vision_encoder.patch_embedding."):
                m.reset_parameters()  # conv stem: PyTorch's fan-in init; std 0.02 would vanish over 3 layers
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        ve = self.vision_encoder
        if isinstance(ve, VisionTransformer):
            nn.init.normal_(ve.position_embedding, std=std)
        if ve is not None and ve.class_embedding is not None:
            nn.init.normal_(ve.class_embedding, std=std)
        # Norm weights start at one (module defaults) and fusion gates at zero (TanhGate).

    @property
    def is_cross(self) -> bool:
        """Media kept beside the sequence (``not fusion.in_sequence``)."""
        return not self.fusion.in_sequence

    @property
    def cross_layers(self) -> nn.ModuleDict:
        return self.decoder.cross_layers

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> InferenceCache:
        return InferenceCache(self.decoder.new_cache(batch_size, max_len))

    # ------------------------------------------------------------------ media
    def encode_images(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Vision encoder + connector for each image: a list of (num_tokens, D_decoder)."""
        if not images:
            return []
        if self.vision_encoder is None:
            raise FeatureCountError(f"{self.config.name} is a text-only model; it takes no images")
        device = self.device
        if isinstance(self.vision_encoder, MllamaVisionEncoder):
            out = self._encode_mllama(images, device)
        else:
            out = self._encode_crops(images, device)
        for img, f in zip(images, out):
            if f.shape[0] != img.num_tokens:  # contract 1: num_tokens equals what the model produces
                raise FeatureCountError(f"image produced {f.shape[0]} tokens but its processor predicted {img.num_tokens}")
        return out

    def vision_features(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """The crop encoder's output for each image, (N_crops, tokens, D_vision): reused where the
        image already carries it (``vision_features``, from a frozen encoder), else computed, the
        crops of one size in one batch. (The tiled Mllama encoder encodes whole images instead.)"""
        device = self.device
        out: list[torch.Tensor | None] = [img.vision_features for img in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            if out[i] is None:
                by_shape.setdefault(tuple(img.pixel_values.shape[1:]), []).append(i)
        for idx in by_shape.values():
            batch = torch.cat([images[i].pixel_values for i in idx]).to(device)  # (N, 3, H, W)
            for i, f in zip(idx, self.vision_encoder(batch).split([images[i].pixel_values.shape[0] for i in idx])):
                out[i] = f
        return out  # type: ignore[return-value]

    def _encode_crops(self, images: list[ProcessedImage], device) -> list[torch.Tensor]:
        feats = self.vision_features(images)
        out: list[torch.Tensor | None] = [None] * len(feats)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(feats):
            by_shape.setdefault(tuple(f.shape[1:]), []).append(i)
        for idx in by_shape.values():  # crops of one size share the connector's batch
            tokens = self.connector(torch.cat([feats[i].to(device) for i in idx]))  # (N, tokens_per_crop, D)
            for i, f in zip(idx, tokens.split([feats[i].shape[0] for i in idx])):
                out[i] = f.reshape(-1, f.shape[-1])
        return out  # type: ignore[return-value]

    def _encode_mllama(self, images: list[ProcessedImage], device) -> list[torch.Tensor]:
        # All tiles of an image (padded to max_num_tiles) go through the encoder together.
        n_max = self.vision_encoder.max_num_tiles
        pixels = torch.stack([img.pixel_values for img in images]).to(device)  # (N, max_tiles, 3, S, S)
        ids = torch.tensor([aspect_ratio_id(*img.tiles, n_max) for img in images], device=device)
        mask = torch.zeros(len(images), n_max, dtype=torch.long, device=device)
        for i, img in enumerate(images):
            mask[i, :img.tiles[0] * img.tiles[1]] = 1
        feats = self.connector(self.vision_encoder(pixels, ids, mask))  # (N, max_tiles, tokens, D)
        return list(feats.flatten(1, 2))

    def image_attendable(self, image: ProcessedImage) -> torch.Tensor | None:
        """(num_tokens,) bool: which of an image's tokens text may attend to (None: all). Padded
        tiles are encoded and cached (as the reference does) but never attended."""
        if not self.config.image.pad_tiles:
            return None
        per_tile = image.num_tokens // image.pixel_values.shape[0]
        real = torch.zeros(image.num_tokens, dtype=torch.bool)
        real[:image.tiles[0] * image.tiles[1] * per_tile] = True
        return real

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = left padding
        images: list[list[ProcessedImage]] | None = None,
        cache: InferenceCache | None = None,
        last_only: bool = False,
        outputs: torch.Tensor | None = None,  # (B, K) long: the positions whose logits are wanted
    ) -> torch.Tensor:  # (B, T, V), (B, 1, V) with last_only, (B, K, V) with outputs
        """``outputs`` (training): the last layer computes only the positions whose logits a loss
        reads (answer tokens are a few of a row's positions) while every position stays a key;
        the result equals the full pass at those positions."""
        b, t = input_ids.shape
        image_features = attendable = None
        if images is not None:
            if len(images) != b:
                raise FeatureCountError(f"got images for {len(images)} rows but the batch has {b}")
            flat = self.encode_images([img for row in images for img in row])
            it = iter(flat)
            image_features = [[next(it) for _ in row] for row in images]
            attendable = [[self.image_attendable(img) for img in row] for row in images]
        x = self.decoder.embed_tokens(input_ids)  # (B, T, D)
        decoding = cache is not None and cache.self_attn.length > 0
        x, cross = self.fusion.enter(self, x, input_ids, image_features, attendable, cache, decoding)
        return self.decoder(attention_mask=attention_mask, cache=cache.self_attn if cache is not None else None,
                            inputs_embeds=x, cross=cross, last_only=last_only, outputs=outputs)


def build_vision_encoder(config: ModelConfig) -> nn.Module:
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
    )


def build_model(config: ModelConfig) -> MultimodalModel:
    return MultimodalModel(config)


def ensure_model_fits(config: ModelConfig, what: str, copies: int = 1, device: str | torch.device = "cpu") -> None:
    """Refuse, before allocating anything, a model whose float32 tensors (times ``copies``: 4 for
    training with AdamW = weights, gradients and two moments) exceed the memory available."""
    from omnifuse.machine import ensure_fits, tensor_bytes

    with torch.device("meta"):
        model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    ensure_fits(copies * tensor_bytes(model), f"{what} ({params:,} float32 parameters"
                                              f"{f' x {copies} for training' if copies > 1 else ''})", device)
