"""Named model configurations.

``tiny-*`` presets are small enough for fast CPU tests and demos. Full-size presets describe
published architectures for the planner and ``omnifuse info``; they are never instantiated with
real memory in tests (``omnifuse info`` builds them on the meta device).
"""

from __future__ import annotations

import dataclasses

from omnifuse.config import (
    AudioConfig,
    ConfigError,
    ConnectorConfig,
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    LayerSpec,
    ModelConfig,
    TextConfig,
    VideoConfig,
    VisionConfig,
)

__all__ = ["PRESETS", "get_preset", "preset_names"]

_TINY_VISION = VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=3, num_heads=4,
                            intermediate_size=128, feature_layer=-2)
_TINY_DECODER = DecoderConfig(vocab_size=260, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                              intermediate_size=256, max_position=2048, rope_theta=10000.0)

PRESETS: dict[str, ModelConfig] = {
    # LLaVA-style: CLIP-like ViT, penultimate layer without CLS, MLP connector, tokens in the sequence.
    "tiny-early": ModelConfig(
        name="tiny-early",
        vision=_TINY_VISION,
        image=ImageConfig(mode="fixed", image_size=64, resize="pad"),
        connector=ConnectorConfig(type="mlp"),
        fusion=FusionConfig(type="early"),
        decoder=_TINY_DECODER,
        text=TextConfig(tokenizer="bytes"),
    ),
    # Llama-3.2-Vision-style: tiles on a best-fit canvas, CLS kept, gated cross-attention layers.
    "tiny-cross": ModelConfig(
        name="tiny-cross",
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=3, num_heads=4,
                            intermediate_size=128, feature_layer=-1, feature_select="full"),
        image=ImageConfig(mode="tiles", image_size=32, max_tiles=4, overview=False),
        connector=ConnectorConfig(type="linear"),
        fusion=FusionConfig(type="cross", cross_attention_layers=(1, 3)),
        decoder=_TINY_DECODER,
        text=TextConfig(tokenizer="bytes"),
    ),
    # LLaVA-1.5 7B (Liu et al. 2023): CLIP ViT-L/14 at 336 px, layer -2 without CLS, mlp2x_gelu,
    # Vicuna-7B (Llama 2 7B) decoder. 576 visual tokens per image.
    "llava-1.5-7b": ModelConfig(
        name="llava-1.5-7b",
        vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                            intermediate_size=4096, activation="quick_gelu", feature_layer=-2,
                            feature_select="default"),
        image=ImageConfig(mode="fixed", image_size=336, resize="pad"),
        connector=ConnectorConfig(type="mlp"),
        fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(vocab_size=32064, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                              intermediate_size=11008, rope_theta=10000.0, max_position=4096),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": "<image>"}, placeholder_ids={"image": 32000}),
    ),
    # Llama 3.2 11B Vision (Meta 2024): 560 px tiles on a canvas of up to 4, each image padded to 4
    # tiles (the reference encodes and caches the padding too) of 1601 states (40x40 + CLS); ViT-H/14
    # with 32 local + 8 gated global layers, features from the last and five intermediate layers
    # (6 x 1280 = 7680 channels); Llama 3.1 8B decoder with 8 gated cross-attention layers (HF stack
    # indices 3, 8, ..., 38 = before every 4th self-attention layer), llama3 RoPE scaling.
    "llama-3.2-11b-vision": ModelConfig(
        name="llama-3.2-11b-vision",
        vision=VisionConfig(type="mllama", image_size=560, patch_size=14, hidden_size=1280, num_layers=32,
                            num_global_layers=8, num_heads=16, intermediate_size=5120, activation="gelu",
                            intermediate_layers=(3, 7, 15, 23, 30), max_num_tiles=4, feature_select="full",
                            pre_norm=False),
        image=ImageConfig(mode="tiles", image_size=560, max_tiles=4, overview=False, pad_tiles=True),
        connector=ConnectorConfig(type="linear"),
        fusion=FusionConfig(type="cross", cross_attention_every=4, cross_attention_span="latest",
                            text_before_media="attend_all"),
        decoder=DecoderConfig(vocab_size=128256, extra_embeddings=8, hidden_size=4096, num_layers=32, num_heads=32,
                              num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0, max_position=131072,
                              rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                              rope_high_freq_factor=4.0, rope_original_max_position=8192),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": "<|image|>"}, placeholder_ids={"image": 128256},
                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", bos_after_leading_images=True),
    ),
}
# Images, audio and video (Gemini-style inputs) on the tiny models: a Whisper-style audio encoder
# pooled to 25 tokens per second (Qwen2-Audio's rate), 10 s chunks; video at 1 frame per second
# through the vision encoder with a temporal embedding; early or cross fusion.
_TINY_AUDIO = AudioConfig(encoder="whisper", chunk_seconds=10.0, max_seconds=120.0, num_mel_bins=80, hidden_size=64,
                          num_layers=2, num_heads=4, intermediate_size=128, pool=2, connector="mlp")
_OMNI_TEXT = TextConfig(tokenizer="bytes", placeholder_tokens={"image": "<image>", "audio": "<audio>",
                                                                 "video": "<video>"})
_TINY_VIDEO = VideoConfig(fps=1.0, max_frames=16, temporal_patch=1)
for _fusion in ("early", "cross"):
    _base = PRESETS[f"tiny-{_fusion}"]
    # Video frames take the vision encoder one crop each: tiny-cross's tiles become fixed crops.
    _image = _base.image if _base.image.mode == "fixed" else ImageConfig(mode="fixed", image_size=_base.image.image_size,
                                                                         resize="pad")
    PRESETS[f"tiny-omni-{_fusion}"] = dataclasses.replace(
        _base, name=f"tiny-omni-{_fusion}", image=_image, audio=_TINY_AUDIO, video=_TINY_VIDEO, text=_OMNI_TEXT,
        decoder=dataclasses.replace(_base.decoder, vocab_size=262))

# Compressing connectors on tiny-early (8 x 8 patch features per 64 px crop, 64 tokens with its MLP):
# BLIP-2's Q-Former (16 queries), Flamingo's perceiver (16 latents) with gated cross-attention,
# Idefics3's pixel shuffle (2 x 2 patches a token, on up to 4 tiles plus the whole image), Gemma 3's
# pooling (to 4 x 4), and token merging (ToMe, 8 tokens merged in each encoder layer that runs).
_early = PRESETS["tiny-early"]
PRESETS["tiny-blip2"] = dataclasses.replace(
    _early, name="tiny-blip2", connector=ConnectorConfig(type="qformer", tokens=16, num_layers=2, num_heads=4))
PRESETS["tiny-flamingo"] = dataclasses.replace(
    _early, name="tiny-flamingo", connector=ConnectorConfig(type="perceiver", tokens=16, num_layers=2, num_heads=4),
    fusion=FusionConfig(type="cross", cross_attention_every=2))
PRESETS["tiny-idefics3"] = dataclasses.replace(
    _early, name="tiny-idefics3", image=ImageConfig(mode="tiles", image_size=64, max_tiles=4, overview=True),
    connector=ConnectorConfig(type="pixel_shuffle", scale_factor=2, bias=False))
PRESETS["tiny-pool"] = dataclasses.replace(
    _early, name="tiny-pool", connector=ConnectorConfig(type="pool", tokens=16, bias=False))
PRESETS["tiny-tome"] = dataclasses.replace(
    _early, name="tiny-tome", vision=dataclasses.replace(_early.vision, merge_tokens=8))

# Decoder layer kinds on tiny-early: a softmax top-2 mixture of 4 experts on every other layer
# (Mixtral's router), a 16-position sliding window on every layer (Mistral), and Llama 4's pattern:
# 16-position chunked attention with the weightless q/k norm on three of every four layers, a NoPE
# full-attention layer with temperature tuning as the fourth, and top-1 sigmoid-routed experts
# beside a shared expert on every layer; and Infini-attention (16-position segments plus the
# compressive memory, delta rule) on every layer.
_dense = _early.decoder
PRESETS["tiny-moe"] = dataclasses.replace(
    _early, name="tiny-moe", decoder=dataclasses.replace(
        _dense, layer_pattern=(LayerSpec(), LayerSpec(feed_forward="moe")), num_experts=4, experts_per_token=2,
        expert_intermediate_size=128))
PRESETS["tiny-sliding"] = dataclasses.replace(
    _early, name="tiny-sliding", decoder=dataclasses.replace(
        _dense, layer_pattern=(LayerSpec(attention="sliding"),), sliding_window=16))
PRESETS["tiny-infini"] = dataclasses.replace(
    _early, name="tiny-infini", decoder=dataclasses.replace(
        _dense, layer_pattern=(LayerSpec(attention="infini"),), memory_segment=16))
PRESETS["tiny-llama4"] = dataclasses.replace(
    _early, name="tiny-llama4", decoder=dataclasses.replace(
        _dense, layer_pattern=(*[LayerSpec(attention="chunked", feed_forward="moe", qk_norm=True)] * 3,
                               LayerSpec(feed_forward="moe", rope=False)),
        attention_chunk_size=16, attn_temperature_floor=32, num_experts=4, experts_per_token=1, router="sigmoid",
        expert_intermediate_size=128, shared_expert_intermediate_size=128))

# SmolVLM-256M (Hugging Face 2025, Idefics3 architecture): SigLIP base/16 at 512 px (no class
# token, no pre-norm, post-norm), pixel shuffle by 4 (32 x 32 patches -> 64 tokens per 512 px
# tile), SmolLM2-135M decoder (30 layers of 576, 9 heads, 3 K/V heads, tied embeddings). Its
# processor's split mode: the longest side to 2048 px, up or down, then 512 px tiles plus the whole
# image (a 512 x 384 photo: 4 x 3 tiles + 1 = 13 crops, 832 tokens). The reference's prompt also puts
# marker tokens around each tile (not counted here).
PRESETS["smolvlm-256m"] = ModelConfig(
    name="smolvlm-256m",
    vision=VisionConfig(image_size=512, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                        intermediate_size=3072, use_cls=False, pre_norm=False, patch_bias=True, norm_eps=1e-6,
                        feature_layer=-1, activation="gelu_tanh", post_norm=True),
    image=ImageConfig(mode="split", image_size=512, longest_edge=2048, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    connector=ConnectorConfig(type="pixel_shuffle", scale_factor=4, bias=False),
    fusion=FusionConfig(type="early"),
    decoder=DecoderConfig(vocab_size=49280, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                          intermediate_size=1536, rope_theta=100000.0, max_position=8192, tie_embeddings=True),
    text=TextConfig(tokenizer="file", placeholder_tokens={"image": "<image>"}, placeholder_ids={"image": 49190}),
)

# Llama 3.2 90B Vision: the 11B's vision tower and tiling on a Llama 3.1 70B decoder (80 self-attention
# layers) with 20 cross-attention layers (HF stack indices 3, 8, ..., 98).
PRESETS["llama-3.2-90b-vision"] = dataclasses.replace(
    PRESETS["llama-3.2-11b-vision"], name="llama-3.2-90b-vision",
    decoder=dataclasses.replace(PRESETS["llama-3.2-11b-vision"].decoder, hidden_size=8192, num_layers=80,
                                num_heads=64, num_kv_heads=8, intermediate_size=28672))


# Llama 4 Scout and Maverick (Meta 2025; meta-llama/Llama-4-Scout-17B-16E and -Maverick-17B-128E
# config.json, transformers' Llama4Config). Vision: 34 layers of 1408, 336 px tiles of 14 px
# patches, the class token last, 2-D RoPE; pixel shuffle 0.5 (144 tokens a tile) into the 4096-wide
# adapter and projector; up to 16 tiles plus a global tile. Decoder: 48 layers of 5120, 40 heads,
# 8 K/V heads of 128; chunked attention (8192) with the weightless q/k norm on three layers of four,
# a NoPE full-attention layer with temperature tuning the fourth; top-1 sigmoid-routed experts of
# 8192 beside a shared one. Scout: 16 experts on every layer, RoPE scaled (llama3, factor 16), a
# 10M context. Maverick: 128 experts on every other layer (dense 16384 between), no q/k norm,
# a 1M context. Instantiated on the meta device only (parameter counts, the planner).
def _llama4_preset(name: str, experts: int, moe_every: int, qk_norm: bool, context: int, rope: dict) -> ModelConfig:
    def layer(i: int) -> LayerSpec:
        nope = i % 4 == 3
        return LayerSpec(attention="full" if nope else "chunked", rope=not nope, qk_norm=qk_norm and not nope,
                         feed_forward="moe" if i % moe_every == moe_every - 1 else "dense")

    return ModelConfig(
        name=name,
        vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1408, num_layers=34, num_heads=16,
                            intermediate_size=5632, use_cls=True, cls_position="last", activation="gelu",
                            post_norm=True, feature_layer=-1, rope_theta=10000.0),
        image=ImageConfig(mode="tiles", image_size=336, max_tiles=16, overview=True, overview_when="several",
                          overview_resample="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          normalise_dtype="bfloat16"),
        connector=ConnectorConfig(type="pixel_shuffle", scale_factor=2, projection="llama4", hidden_size=4096,
                                  bias=False),
        fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(vocab_size=202048, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
                              head_dim=128, intermediate_size=16384, rope_theta=500000.0, max_position=context,
                              layer_pattern=tuple(layer(i) for i in range(4)),  # tiled to the 48 layers
                              num_experts=experts, experts_per_token=1, router="sigmoid",
                              expert_intermediate_size=8192, shared_expert_intermediate_size=8192,
                              attention_chunk_size=8192, attn_temperature_floor=8192, attn_temperature_scale=0.1,
                              **rope),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": "<|patch|>"},
                        placeholder_ids={"image": 200092}, image_span="llama4", prompt_image_token="<|image|>"),
    )


PRESETS["llama-4-scout"] = _llama4_preset(
    "llama-4-scout", 16, 1, True, 10_485_760,
    dict(rope_type="llama3", rope_factor=16.0, rope_low_freq_factor=1.0, rope_high_freq_factor=1.0,
         rope_original_max_position=8192))
PRESETS["llama-4-maverick"] = _llama4_preset("llama-4-maverick", 128, 2, False, 1_048_576, {})


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}") from None
