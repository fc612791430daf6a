"""BLIP-2 and InstructBLIP checkpoints with a Llama language model in Hugging Face layout
(``Blip2ForConditionalGeneration``, ``InstructBlipForConditionalGeneration``; InstructBLIP-Vicuna).

EVA/BLIP vision tower (class token, learned positions, pre-norm layers with a fused ``qkv``
projection, ``post_layernorm`` over every token) -> Q-Former (``num_query_tokens`` learned
queries, BERT post-norm layers, cross-attention to all the vision tokens every
``cross_attention_frequency``-th layer) -> ``language_projection`` -> Llama decoder, the query
outputs written over the ``<image>`` tokens. The processor stretches the image to the tower's
square (bicubic) and puts ``num_query_tokens`` image tokens in front of the tokenized text, bos
included (``text.images_before_bos``). InstructBLIP's Q-Former also reads the prompt, tokenized by
the BERT tokenizer the processor saves in ``qformer_tokenizer/``: those tokens join the queries in
self-attention and only the query outputs go on.

Keys: ``vision_model.*``, ``query_tokens``, ``qformer.*`` (BLIP-2: ``qformer.layernorm``;
InstructBLIP: ``qformer.embeddings.*``), ``language_projection``, ``language_model.model.*``,
``language_model.lm_head``. transformers 5 saves the vision attention bias as one ``qkv.bias``;
earlier files hold ``q_bias`` and ``v_bias`` (the key bias is zero there), and both load.
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
    Reshaped,
    Split,
    build_on_meta,
    llama_decoder_key_map,
    llama_decoder_kwargs,
    load_mapped,
    placeholder_text,
    read_json_if_present,
    square_stretch_config,
    vision_activation,
)

__all__ = ["blip2_config", "blip2_key_map", "load_blip2"]

# transformers' Blip2VisionConfig / InstructBlipVisionConfig and Q-Former config defaults, for keys a
# saved config leaves out.
_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                        num_channels=3)
_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, layer_norm_eps=1e-12,
                         cross_attention_frequency=2, position_embedding_type="absolute", use_qformer_text_input=False)
# BlipImageProcessor's class defaults.
_PROCESSOR_DEFAULTS = dict(resample=3, size={"height": 384, "width": 384}, do_resize=True, do_rescale=True,
                           rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)
QFORMER_TOKENIZER = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts the BERT tokenizer


def _image_config(folder: Path, side: int) -> tuple[ImageConfig, int | None]:
    """(the processor's settings as an ImageConfig, its saved ``num_query_tokens`` if any)."""
    queries = read_json_if_present(folder / "processor_config.json").get("num_query_tokens")
    return square_stretch_config(folder, side, _PROCESSOR_DEFAULTS, "BLIP-2"), queries


def _vision_config(vision: dict[str, Any], where: str) -> VisionConfig:
    v = {**_VISION_DEFAULTS, **vision}
    act = vision_activation(v["hidden_act"], where)
    if not v["qkv_bias"]:
        raise CheckpointError(f"{where}: vision qkv_bias=false is not supported (BLIP-2 and InstructBLIP have it on)")
    return VisionConfig(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                        hidden_size=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]),
                        num_heads=int(v["num_attention_heads"]), intermediate_size=int(v["intermediate_size"]),
                        num_channels=int(v["num_channels"]), use_cls=True, feature_select="full", activation=act,
                        norm_eps=float(v["layer_norm_eps"]), pre_norm=False, patch_bias=True, qkv_bias=True,
                        feature_layer=-1, post_norm=True)


def _connector_config(q: dict[str, Any], queries: int, vision_width: int, instruct: bool, where: str) -> ConnectorConfig:
    q = {**_QFORMER_DEFAULTS, **q}
    if q["hidden_act"] != "gelu":
        raise CheckpointError(f"{where}: qformer hidden_act {q['hidden_act']!r} is not supported (gelu)")
    if abs(float(q["layer_norm_eps"]) - 1e-12) > 1e-15:
        raise CheckpointError(f"{where}: qformer layer_norm_eps {q['layer_norm_eps']} is not supported (1e-12)")
    if instruct and q["position_embedding_type"] != "absolute":
        raise CheckpointError(f"{where}: qformer position_embedding_type {q['position_embedding_type']!r} is not "
                              "supported (absolute)")
    if int(q.get("encoder_hidden_size", vision_width)) != vision_width:
        raise CheckpointError(f"{where}: qformer encoder_hidden_size {q['encoder_hidden_size']} but the vision tower "
                              f"is {vision_width} wide")
    return ConnectorConfig(type="qformer", tokens=queries, num_layers=int(q["num_hidden_layers"]),
                           hidden_size=int(q["hidden_size"]), num_heads=int(q["num_attention_heads"]),
                           intermediate_size=int(q["intermediate_size"]),
                           cross_attention_every=int(q["cross_attention_frequency"]), feature_norm=False,
                           instruction_vocab_size=int(q["vocab_size"]) if instruct else 0,
                           instruction_positions=int(q["max_position_embeddings"]))


def blip2_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a BLIP-2 or InstructBLIP ``config.json`` and its processor files."""
    folder = Path(folder)
    where = str(folder / "config.json")
    instruct = hf.get("model_type") == "instructblip"
    text = hf.get("text_config") or {}
    if text.get("model_type", "opt") != "llama":
        raise CheckpointError(f"{where}: language model {text.get('model_type', 'opt')!r} is not supported "
                              "(supported: llama, as in InstructBLIP-Vicuna)")
    vision = _vision_config(hf.get("vision_config") or {}, where)
    queries = int(hf.get("num_query_tokens", 32))
    image, saved_queries = _image_config(folder, vision.image_size)
    if saved_queries is not None and int(saved_queries) != queries:
        raise CheckpointError(f"{folder / 'processor_config.json'}: num_query_tokens {saved_queries} but the model "
                              f"has {queries} queries")
    token_id = hf.get("image_token_index", hf.get("image_token_id"))
    if token_id is None:
        raise CheckpointError(f"{where} has no image_token_index: the query outputs have no place in the prompt "
                              "(checkpoints from before transformers 4.47 lack it; add the id of the tokenizer's "
                              "<image> token)")
    token_id = int(token_id)
    return ModelConfig(
        name=str(folder.name),
        vision=vision,
        image=image,
        connector=_connector_config(hf.get("qformer_config") or {}, queries, vision.hidden_size, instruct, where),
        fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(**llama_decoder_kwargs(text)),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": placeholder_text(folder, token_id)},
                        placeholder_ids={"image": token_id}, images_before_bos=True,
                        instruction_tokenizer=QFORMER_TOKENIZER if instruct else ""),
    )


def normalise_blip2_key(key: str) -> str:
    key = re.sub(r"^language_model\.model\.", "language_model.", key)
    return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)


def blip2_key_map(instruct: bool) -> KeyMap:
    v, q = r"vision_model\.", r"qformer\.encoder\.layer\.(\d+)\."
    attn = r"encoders.image.layers.\1.self_attn."
    proj = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    qformer = []
    for kind, target in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        qformer += [(rf"{q}{kind}\.attention\.{name}\.(weight|bias)", rf"connectors.image.layers.\1.{target}.{ours}.\2")
                    for name, ours in proj.items()]
        qformer += [(rf"{q}{kind}\.output\.dense\.(weight|bias)", rf"connectors.image.layers.\1.{target}.o_proj.\2"),
                    (rf"{q}{kind}\.output\.LayerNorm\.(weight|bias)", rf"connectors.image.layers.\1.{target}_norm.\2")]
    # the instruction tokens' feed-forward blocks; a BLIP-2 file may hold them unused (use_qformer_text_input)
    text_ffn = [(rf"{q}intermediate\.dense\.(weight|bias)", r"connectors.image.layers.\1.text_mlp.fc1.\2"),
                (rf"{q}output\.dense\.(weight|bias)", r"connectors.image.layers.\1.text_mlp.fc2.\2"),
                (rf"{q}output\.LayerNorm\.(weight|bias)", r"connectors.image.layers.\1.text_mlp_norm.\2")]
    return [
        (rf"{v}embeddings\.class_embedding", Reshaped("encoders.image.class_embedding")),
        (rf"{v}embeddings\.position_embedding", Reshaped("encoders.image.position_embedding")),
        (rf"{v}embeddings\.patch_embedding\.(weight|bias)", r"encoders.image.patch_embedding.\1"),
        (rf"{v}encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)",
         Split((attn + r"q_proj.\2", attn + r"k_proj.\2", attn + r"v_proj.\2"))),
        (rf"{v}encoder\.layers\.(\d+)\.self_attn\.q_bias", attn + "q_proj.bias"),  # before transformers 5
        (rf"{v}encoder\.layers\.(\d+)\.self_attn\.v_bias", attn + "v_proj.bias"),
        (rf"{v}encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", attn + r"o_proj.\2"),
        (rf"{v}encoder\.layers\.(\d+)\.(layer_norm[12]|mlp\.fc[12])\.(weight|bias)", r"encoders.image.layers.\1.\2.\3"),
        (rf"{v}post_layernorm\.(weight|bias)", r"encoders.image.post_layernorm.\1"),
        (r"query_tokens", Reshaped("connectors.image.query_tokens")),
        (r"qformer\.(?:embeddings\.)?layernorm\.(weight|bias)", r"connectors.image.query_norm.\1"),
        (r"qformer\.embeddings\.(word_embeddings|position_embeddings)\.weight", r"connectors.image.\1.weight"),
        (r"qformer\.embeddings\.position_ids", None),
        *qformer,
        (rf"{q}intermediate_query\.dense\.(weight|bias)", r"connectors.image.layers.\1.mlp.fc1.\2"),
        (rf"{q}output_query\.dense\.(weight|bias)", r"connectors.image.layers.\1.mlp.fc2.\2"),
        (rf"{q}output_query\.LayerNorm\.(weight|bias)", r"connectors.image.layers.\1.mlp_norm.\2"),
        *(text_ffn if instruct else [(p, None) for p, _ in text_ffn]),
        (r"language_projection\.(weight|bias)", r"connectors.image.proj.\1"),
        *llama_decoder_key_map("language_model."),
    ]


def load_blip2(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = blip2_config(hf, folder)
    model = build_on_meta(config)
    instruct = config.connector.instruction_vocab_size > 0
    return load_mapped(model, folder, blip2_key_map(instruct), normalise_blip2_key, device=device,
                       zero_if_absent=r"encoders\.image\.layers\.\d+\.self_attn\.k_proj\.bias").eval()
