"""IDEFICS (v1, the open Flamingo) checkpoints in Hugging Face layout (``IdeficsForVisionText2Text``).

CLIP vision tower (class token kept, pre-norm, last layer's states; the pooled-output norm unused)
-> perceiver resampler (``resampler_n_latents`` latents, ReLU feed-forward, no biases, no projection:
its latents stay at the tower's width) -> a Llama decoder with a gated cross-attention block before
every ``cross_layer_interval``-th layer, whose keys and values project the latents. The reference's
image attention mask is reproduced through ``FusionConfig``: a token reads only the latest image at
or before it (``latest_image``); a token before any image gets no cross-attention output but still
the gated MLP's (``skip_attention``). The extra vocabulary (``additional_vocab_size``: the
``<fake_token_around_image>`` and ``<image>`` ids) is a second embedding and output matrix in the
file; here both are rows after the base vocabulary of one embedding and one LM head.

The processor prepends the bos, strips spaces around each image and frames it with
``<fake_token_around_image>`` (``text.image_span: idefics``, processing/prompt.py). Its mask also
hides every image from the tokens after an end-of-sequence token until the next image (packed
documents); omnifuse does not reproduce that, so a prompt holding ``</s>`` before its last text
differs there.

Keys: ``model.vision_model.*``, ``model.perceiver_resampler.*``, ``model.gated_cross_attn_layers.K``
(before decoder layer ``K x cross_layer_interval``), ``model.embed_tokens[.additional_embedding]``,
``model.layers.*``, ``model.norm``, ``lm_head[.additional_fc]``.
"""

from __future__ import annotations

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
    Rows,
    build_on_meta,
    llama_decoder_kwargs,
    load_mapped,
    square_stretch_config,
    token_id_of,
    vision_activation,
)
from omnifuse.processing.prompt import FAKE_IMAGE_TOKEN

__all__ = ["idefics_config", "idefics_key_map", "load_idefics"]

# transformers' IdeficsVisionConfig and IdeficsPerceiverConfig defaults, for keys a saved config leaves out.
_VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32,
                        num_attention_heads=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)
_PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96,
                           qk_layer_norms_perceiver=False)
# IdeficsImageProcessor's class defaults.
_PROCESSOR_DEFAULTS = dict(resample=3, size={"height": 224, "width": 224}, do_resize=True, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
IMAGE_TOKEN = "<image>"


def _image_config(folder: Path, side: int) -> ImageConfig:
    # IdeficsImageProcessor: image_size (the published files' key), when saved, overrides size.
    return square_stretch_config(folder, side, _PROCESSOR_DEFAULTS, "IDEFICS", size_key="image_size")


def _vision_config(vision: dict[str, Any], where: str) -> VisionConfig:
    v = {**_VISION_DEFAULTS, **vision}
    act = vision_activation(v["hidden_act"], where)
    return VisionConfig(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                        hidden_size=int(v["embed_dim"]), num_layers=int(v["num_hidden_layers"]),
                        num_heads=int(v["num_attention_heads"]), intermediate_size=int(v["intermediate_size"]),
                        num_channels=int(v["num_channels"]), use_cls=True, feature_select="full", activation=act,
                        norm_eps=float(v["layer_norm_eps"]), pre_norm=True, patch_bias=False, qkv_bias=True,
                        feature_layer=-1)


def _connector_config(hf: dict[str, Any], width: int, where: str) -> ConnectorConfig:
    if not hf.get("use_resampler", False):
        raise CheckpointError(f"{where}: use_resampler=false (cross-attention over every vision token, no perceiver) "
                              "is not supported; the published IDEFICS checkpoints use the resampler")
    p = {**_PERCEIVER_DEFAULTS, **(hf.get("perceiver_config") or {})}
    if p["qk_layer_norms_perceiver"]:
        raise CheckpointError(f"{where}: perceiver_config.qk_layer_norms_perceiver=true is not supported "
                              "(the published IDEFICS checkpoints have it off)")
    return ConnectorConfig(type="perceiver", tokens=int(p["resampler_n_latents"]), num_layers=int(p["resampler_depth"]),
                           hidden_size=width, num_heads=int(p["resampler_n_heads"]),
                           head_dim=int(p["resampler_head_dim"]), intermediate_size=4 * width, activation="relu",
                           bias=False, projection="none")


def _cross_layers(hf: dict[str, Any], where: str) -> tuple[int, ...]:
    layers, interval = int(hf.get("num_hidden_layers", 32)), int(hf.get("cross_layer_interval", 1))
    if interval < 1 or layers % interval:
        raise CheckpointError(f"{where}: num_hidden_layers {layers} is not a multiple of cross_layer_interval "
                              f"{interval} (the reference then has no cross-attention block for its last group)")
    if hf.get("alpha_type", "float") != "float":
        raise CheckpointError(f"{where}: alpha_type {hf['alpha_type']!r} is not supported (float: one tanh gate "
                              "per block, as in the published checkpoints)")
    return tuple(range(0, layers, interval))


def idefics_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of an IDEFICS ``config.json``, its tokenizer and its processor files."""
    folder = Path(folder)
    where = str(folder / "config.json")
    vision = _vision_config(hf.get("vision_config") or {}, where)
    image_id = token_id_of(folder, IMAGE_TOKEN)
    if image_id is None or token_id_of(folder, FAKE_IMAGE_TOKEN) is None:
        raise CheckpointError(f"{folder / 'tokenizer.json'} lacks IDEFICS's {IMAGE_TOKEN} or {FAKE_IMAGE_TOKEN} "
                              "token: the processor's image markers cannot be written")
    if hf.get("tie_word_embeddings", False):
        raise CheckpointError(f"{where}: tie_word_embeddings=true is not supported (the published IDEFICS "
                              "checkpoints keep the LM head apart from the embeddings)")
    decoder = llama_decoder_kwargs(hf)
    decoder["vocab_size"] += int(hf.get("additional_vocab_size", 0))
    return ModelConfig(
        name=str(folder.name),
        vision=vision,
        image=_image_config(folder, vision.image_size),
        connector=_connector_config(hf, vision.hidden_size, where),
        fusion=FusionConfig(type="cross", cross_attention_layers=_cross_layers(hf, where),
                            cross_attention_span="latest_image", text_before_media="skip_attention",
                            cross_attention_qk_norm=bool(hf.get("qk_layer_norms", False))),
        decoder=DecoderConfig(**decoder),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": IMAGE_TOKEN}, placeholder_ids={"image": image_id},
                        image_span="idefics"),
    )


def idefics_key_map(hf: dict[str, Any]) -> KeyMap:
    v = r"model\.vision_model\."
    block = r"model\.perceiver_resampler\.blocks\.(\d+)\."
    latent = r"connectors.image.layers.\1."
    interval, vocab = int(hf.get("cross_layer_interval", 1)), int(hf.get("vocab_size", 32000))
    cross: KeyMap = []
    for k in range(int(hf.get("num_hidden_layers", 32)) // interval):
        p, t = rf"model\.gated_cross_attn_layers\.{k}\.", f"decoder.cross_layers.{k * interval}."
        cross += [(p + "alpha_cross_attn", t + "attn_gate.gate"), (p + "alpha_dense", t + "mlp_gate.gate"),
                  (p + r"cross_attn\.(q|k)_layer_norm\.weight", t + r"cross_attn.\1_norm.weight"),
                  (p + r"(.+)", t + r"\1")]
    return [
        (rf"{v}embeddings\.class_embedding", "encoders.image.class_embedding"),
        (rf"{v}embeddings\.patch_embedding\.weight", "encoders.image.patch_embedding.weight"),
        (rf"{v}embeddings\.position_embedding\.weight", "encoders.image.position_embedding"),
        (rf"{v}embeddings\.position_ids", None),
        (rf"{v}pre_layrnorm\.(weight|bias)", r"encoders.image.pre_layernorm.\1"),
        (rf"{v}encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"encoders.image.layers.\1.self_attn.o_proj.\2"),
        (rf"{v}encoder\.layers\.(\d+)\.(.+)", r"encoders.image.layers.\1.\2"),
        (rf"{v}post_layernorm\.(weight|bias)", None),  # the pooled output's norm; IDEFICS reads every token
        (r"model\.perceiver_resampler\.latents", "connectors.image.latents"),
        (rf"{block}0\.context_layer_norm\.(weight|bias)", latent + r"media_norm.\2"),
        (rf"{block}0\.latents_layer_norm\.(weight|bias)", latent + r"latent_norm.\2"),
        (rf"{block}0\.(q_proj|k_proj|v_proj)\.weight", latent + r"attn.\2.weight"),
        (rf"{block}0\.output_proj\.weight", latent + "attn.o_proj.weight"),
        (rf"{block}1\.ln\.(weight|bias)", latent + r"mlp_norm.\2"),
        (rf"{block}1\.fc\.weight", latent + "mlp.fc1.weight"),
        (rf"{block}1\.c_proj\.weight", latent + "mlp.fc2.weight"),
        (r"model\.perceiver_resampler\.layer_norm\.(weight|bias)", r"connectors.image.norm.\1"),
        (r".*rotary_emb\.inv_freq", None),
        *cross,
        (r"model\.embed_tokens\.weight", Rows("decoder.embed_tokens.weight", 0)),
        (r"model\.embed_tokens\.additional_embedding\.weight", Rows("decoder.embed_tokens.weight", vocab)),
        (r"model\.layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
        (r"model\.norm\.weight", "decoder.norm.weight"),
        (r"lm_head\.weight", Rows("decoder.lm_head.weight", 0)),
        (r"lm_head\.additional_fc\.weight", Rows("decoder.lm_head.weight", vocab)),
    ]


def load_idefics(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = idefics_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, idefics_key_map(hf), device=device).eval()
