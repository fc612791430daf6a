"""The multimodal model: vision encoder -> connector -> fusion (early or cross) -> decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omnifuse.config import ModelConfig
from omnifuse.connectors import CONNECTORS
from omnifuse.encoders import VisionTransformer
from omnifuse.encoders.mllama_vision import MllamaVisionEncoder
from omnifuse.fusion import (CrossAttentionLayer, FeatureCountError, build_memory, cross_attention_mask,
                             splice_features, visible_images)
from omnifuse.inference.cache import CrossAttentionCache, InferenceCache, KVCache
from omnifuse.nn import RMSNorm, RotaryEmbedding, SelfAttention, SwiGLU
from omnifuse.nn.attention import select_rows
from omnifuse.processing.image import ImageProcessor, ProcessedImage, aspect_ratio_id

__all__ = ["DecoderLayer", "MultimodalModel", "build_image_processor", "build_model", "build_vision_encoder",
           "ensure_model_fits"]


class DecoderLayer(nn.Module):
    """Llama block: x + attn(norm(x)); x + swiglu(norm(x))."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, eps: float,
                 bias: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, num_kv_heads, head_dim, bias=bias)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, cos, sin, mask, cache=None, start: int = 0, queries=None):
        # (B, T, D) -> (B, T, D); with queries (B, K) positions: (B, K, D), those positions only
        h = self.input_layernorm(x)
        if queries is not None:
            x = select_rows(x, queries)
        x = x + self.self_attn(h, cos, sin, mask, cache, start, queries)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_image_processor(config: ModelConfig) -> ImageProcessor:
    return ImageProcessor(config.image, patch_size=config.vision.patch_size, cls_tokens=config.vision.cls_tokens)


@dataclass
class _Positions:
    position_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor | None  # (B, 1, T, S) bool, or None when plain causal attention suffices
    start: int


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
        self.vision_encoder = build_vision_encoder(config)
        self.connector = CONNECTORS[config.connector.type](
            v.feature_dim, d.hidden_size, bias=config.connector.bias,
            positions=config.tokens_per_crop if config.connector.position_embedding else 0)
        self.embed_tokens = nn.Embedding(d.vocab_size + d.extra_embeddings, d.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size, d.norm_eps,
                         bias=d.attention_bias)
            for _ in range(d.num_layers)
        )
        self.cross_layers = nn.ModuleDict({
            str(i): CrossAttentionLayer(d.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim,
                                        d.intermediate_size, d.norm_eps,
                                        zero_blind_attention=config.fusion.text_before_media == "skip")
            for i in config.cross_layers
        })
        self.norm = RMSNorm(d.hidden_size, d.norm_eps)
        self.lm_head = nn.Linear(d.hidden_size, d.vocab_size, bias=False)
        self.tie_weights()
        scaling = None
        if d.rope_type == "llama3":
            scaling = {"factor": d.rope_factor, "low_freq_factor": d.rope_low_freq_factor,
                       "high_freq_factor": d.rope_high_freq_factor, "original_max_position": d.rope_original_max_position}
        self.rope = RotaryEmbedding(d.head_dim, d.rope_theta, scaling)
        self.image_processor = build_image_processor(config)
        self.placeholder_id: int | None = None  # set by the pipeline from the tokenizer
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def tie_weights(self) -> None:
        """Share the input embedding with the output head when the config says so (again after
        ``to_empty``, which gives every parameter its own storage)."""
        if self.config.decoder.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

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
        if ve.class_embedding is not None:
            nn.init.normal_(ve.class_embedding, std=std)
        # Norm weights start at one (module defaults) and fusion gates at zero (TanhGate).

    @property
    def is_cross(self) -> bool:
        return self.config.fusion.type == "cross"

    def new_cache(self, batch_size: int, max_len: int) -> InferenceCache:
        d = self.config.decoder
        if max_len > d.max_position:
            raise ValueError(f"cache length {max_len} exceeds the context length {d.max_position}")
        p = self.embed_tokens.weight
        return InferenceCache(KVCache(d.num_layers, batch_size, d.num_kv_heads, max_len, d.head_dim,
                                      dtype=p.dtype, device=p.device))

    # ------------------------------------------------------------------ media
    def encode_images(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Vision encoder + connector for each image: a list of (num_tokens, D_decoder)."""
        if not images:
            return []
        device = self.embed_tokens.weight.device
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
        device = self.embed_tokens.weight.device
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
    def _positions(self, attention_mask: torch.Tensor, cache: KVCache | None) -> _Positions:
        b, t = attention_mask.shape
        start = cache.length if cache is not None else 0
        offset = cache.next_position[:, None] if cache is not None else 0
        position_ids = (offset + attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        if cache is not None:
            if start + t > cache.max_len:
                raise ValueError(f"sequence of {start + t} tokens exceeds the cache length {cache.max_len}")
            cache.key_mask[:, start:start + t] = attention_mask.bool()
            cache.next_position += attention_mask.long().sum(1)
            keys = cache.key_mask[:, :start + t]
        else:
            keys = attention_mask.bool()
        if bool(keys.all()) and (start == 0 or t == 1):
            return _Positions(position_ids, None, start)  # plain causal (prefill) / full (decode)
        s = start + t
        q_pos = torch.arange(start, s, device=keys.device)[:, None]  # (T, 1)
        k_pos = torch.arange(s, device=keys.device)[None, :]  # (1, S)
        causal = k_pos <= q_pos  # (T, S)
        # A query at a padding position would see no key at all (NaN); let it see itself.
        mask = (keys[:, None, :] & causal) | (k_pos == q_pos)  # (B, T, S)
        return _Positions(position_ids, mask[:, None], start)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = left padding
        images: list[list[ProcessedImage]] | None = None,
        cache: InferenceCache | None = None,
        image_features: list[list[torch.Tensor]] | None = None,  # precomputed (n_i, D) per image
        last_only: bool = False,
        outputs: torch.Tensor | None = None,  # (B, K) long: the positions whose logits are wanted
    ) -> torch.Tensor:  # (B, T, V), (B, 1, V) with last_only, (B, K, V) with outputs
        """``outputs`` (training): the last layer computes only the positions whose logits a loss
        reads (answer tokens are a few of a row's positions) while every position stays a key;
        the result equals the full pass at those positions."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attendable = None
        if images is not None and image_features is None:
            if len(images) != b:
                raise FeatureCountError(f"got images for {len(images)} rows but the batch has {b}")
            flat = self.encode_images([img for row in images for img in row])
            it = iter(flat)
            image_features = [[next(it) for _ in row] for row in images]
            attendable = [[self.image_attendable(img) for img in row] for row in images]
        x = self.embed_tokens(input_ids)  # (B, T, D)
        # Media enter at prefill. A placeholder id the model itself generates later is just a token.
        decoding = cache is not None and cache.self_attn.length > 0
        has_media = image_features is not None and any(len(r) for r in image_features)
        if not self.is_cross and not decoding and (has_media or self._count_placeholders(input_ids)):
            x = splice_features(x, input_ids, image_features or [[] for _ in range(b)], self._placeholder())
        cross = self._cross_inputs(input_ids, image_features, attendable, cache, decoding, x.dtype) if self.is_cross else None

        kv_cache = cache.self_attn if cache is not None else None
        pos = self._positions(attention_mask, kv_cache)
        cos, sin = self.rope(pos.position_ids, x.dtype)
        last = len(self.layers) - 1
        for i in range(len(self.layers) + 1):
            if cross is not None and str(i) in self.cross_layers:
                kv = cross[0][i] if cross[0] is not None else self.cross_layers[str(i)].cross_attn.memory_kv(cross[3])
                mask, row_visible = cross[1], cross[2]
                if i > last and outputs is not None:  # after the last layer: the kept positions only
                    mask = select_rows(mask.squeeze(1), outputs).unsqueeze(1)
                    row_visible = select_rows(row_visible, outputs)
                x = self.cross_layers[str(i)](x, kv, mask, row_visible)
            if i < len(self.layers):
                x = self.layers[i](x, cos, sin, pos.mask, kv_cache.layer(i) if kv_cache is not None else None,
                                   pos.start, outputs if i == last else None)
        if kv_cache is not None:
            kv_cache.length += t
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _placeholder(self) -> int:
        if self.placeholder_id is None:
            raise FeatureCountError("the model has no image placeholder id; set model.placeholder_id")
        return self.placeholder_id

    def _count_placeholders(self, input_ids: torch.Tensor) -> int:
        return 0 if self.placeholder_id is None else int((input_ids == self.placeholder_id).sum())

    def _cross_inputs(self, input_ids, image_features, attendable, cache, decoding, dtype):
        """(kv per layer or None, mask, row_visible, memory) for the cross-attention layers, or None
        when the batch has no media. At decode every new token reads what the last prompt token read
        (Llama 3.2 Vision repeats the last row of its mask the same way)."""
        if decoding:
            if cache.cross is None:
                return None
            c = cache.cross
            return c.kv, c.last_mask, c.last_row_visible.to(dtype), None
        placeholders = (input_ids == self.placeholder_id) if self.placeholder_id is not None else \
            torch.zeros_like(input_ids, dtype=torch.bool)
        if image_features is None:
            if int(placeholders.sum()):
                raise FeatureCountError(f"the prompt has {int(placeholders.sum())} image placeholder tokens but no images were given")
            return None  # no media anywhere in the batch: every cross-attention layer is identity
        for row, feats in enumerate(image_features):
            n = int(placeholders[row].sum())
            if n != len(feats):
                raise FeatureCountError(f"row {row}: the prompt has {n} image placeholder tokens but {len(feats)} images were given")
        fusion = self.config.fusion
        mem = build_memory(image_features, self.config.decoder.hidden_size, dtype, input_ids.device, attendable)
        visible = visible_images(placeholders, max(len(r) for r in image_features), fusion.cross_attention_span)
        mask, row_visible = cross_attention_mask(visible, mem.image_index, mem.real,
                                                 attend_all_when_blind=fusion.text_before_media == "attend_all")
        kv = None
        if cache is not None:
            kv = {int(i): layer.cross_attn.memory_kv(mem.features) for i, layer in self.cross_layers.items()}
            cache.cross = _decode_cross_cache(kv, mask[:, 0, -1], row_visible[:, -1:])
        return kv, mask, row_visible.to(dtype), mem.features


def _decode_cross_cache(kv: dict[int, tuple[torch.Tensor, torch.Tensor]], last: torch.Tensor,
                        last_row_visible: torch.Tensor) -> CrossAttentionCache:
    """Keep, for decoding, only the media states the last prompt token attends to (decode tokens
    attend exactly those): padded tiles and images outside its span cost nothing per step.
    kv: (B, Hkv, M, Dh) per layer; last: (B, M) bool."""
    counts = last.sum(dim=1)  # (B,)
    keep = int(counts.max())
    order = torch.argsort((~last).to(torch.int8), dim=1, stable=True)[:, :keep]  # attended positions first
    compact = {}
    for i, (k, v) in kv.items():
        idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # (B, Hkv, keep, Dh)
        compact[i] = (k.gather(2, idx), v.gather(2, idx))
    valid = torch.arange(keep, device=last.device)[None, :] < counts[:, None]  # (B, keep)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    return CrossAttentionCache(compact, mask, last_row_visible.clone())


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
