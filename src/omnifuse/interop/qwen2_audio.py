"""Qwen2-Audio checkpoints in Hugging Face layout (``Qwen2AudioForConditionalGeneration``).

Whisper log-mel features of each clip, padded to one ``chunk_length`` window (30 s) -> the Whisper
encoder (two convolutions, the second with stride 2; positions; pre-norm blocks with the padding
keys masked; average pooling by 2; LayerNorm) -> a linear projector -> a Qwen2 decoder (Llama with
q/k/v biases), the audio tokens written over the expanded ``<|AUDIO|>`` placeholder. That is
omnifuse's ``audio.encoder: whisper`` with ``pool: 2``, early fusion.

One difference from the reference processor: a clip longer than the window is cut there by
``WhisperFeatureExtractor`` (truncation), while omnifuse encodes every window of it (more tokens);
clips up to the window give the same features and tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import AudioConfig, DecoderConfig, FusionConfig, ModelConfig, TextConfig
from omnifuse.interop.hf import (
    KeyMap,
    build_on_meta,
    llama_decoder_key_map,
    llama_decoder_kwargs,
    load_mapped,
    placeholder_text,
    read_json_if_present,
)

__all__ = ["load_qwen2_audio", "qwen2_audio_config", "qwen2_audio_key_map"]

# transformers' WhisperFeatureExtractor defaults, for keys a saved processor leaves out.
_FEATURE_DEFAULTS = dict(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
                         padding_value=0.0, dither=0.0)
# transformers' Qwen2AudioEncoderConfig defaults.
_ENCODER_DEFAULTS = dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                         d_model=1280, activation_function="gelu", scale_embedding=False, max_source_positions=1500)


def _feature_settings(folder: Path) -> tuple[dict[str, Any], str]:
    nested = read_json_if_present(folder / "processor_config.json").get("feature_extractor")
    if isinstance(nested, dict):
        return {**_FEATURE_DEFAULTS, **nested}, "processor_config.json"
    if (folder / "preprocessor_config.json").is_file():
        return {**_FEATURE_DEFAULTS, **read_json_if_present(folder / "preprocessor_config.json")}, \
            "preprocessor_config.json"
    import warnings

    from omnifuse.config import LoudDefaultWarning

    warnings.warn(f"{folder} has no processor_config.json or preprocessor_config.json: audio is featurised with "
                  "WhisperFeatureExtractor's defaults and the encoder's mel bins; copy the reference processor's "
                  "config into the folder to use its settings", LoudDefaultWarning, stacklevel=3)
    return dict(_FEATURE_DEFAULTS), "defaults"


def qwen2_audio_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of a Qwen2-Audio ``config.json`` and its feature extractor settings."""
    folder = Path(folder)
    enc = {**_ENCODER_DEFAULTS, **(hf.get("audio_config") or {})}
    text = hf.get("text_config") or {}
    if text.get("model_type", "qwen2") != "qwen2":
        raise CheckpointError(f"Qwen2-Audio language model {text.get('model_type')!r} is not supported (qwen2)")
    if text.get("use_sliding_window"):
        raise CheckpointError(f"{folder / 'config.json'}: use_sliding_window is not supported for qwen2")
    if enc["activation_function"] != "gelu" or enc["scale_embedding"]:
        raise CheckpointError(f"{folder / 'config.json'}: audio encoder activation {enc['activation_function']!r} / "
                              f"scale_embedding {enc['scale_embedding']} is not supported (gelu, false)")
    feats, source = _feature_settings(folder)
    where = folder / source
    if source == "defaults":
        feats["feature_size"] = enc["num_mel_bins"]
    if feats.get("dither", 0.0) or feats.get("padding_value", 0.0):
        raise CheckpointError(f"{where}: dither and padding_value must be 0")
    if int(feats["feature_size"]) != enc["num_mel_bins"]:
        raise CheckpointError(f"{where}: feature_size {feats['feature_size']} but the encoder takes "
                              f"{enc['num_mel_bins']} mel bins")
    audio = AudioConfig(
        sampling_rate=int(feats["sampling_rate"]), num_mel_bins=int(feats["feature_size"]), n_fft=int(feats["n_fft"]),
        hop_length=int(feats["hop_length"]), chunk_seconds=float(feats["chunk_length"]), encoder="whisper",
        hidden_size=enc["d_model"], num_layers=enc["encoder_layers"], num_heads=enc["encoder_attention_heads"],
        intermediate_size=enc["encoder_ffn_dim"], pool=2, connector="linear")
    if (audio.chunk_frames - 1) // 2 + 1 != enc["max_source_positions"]:
        raise CheckpointError(f"{where}: chunk_length {feats['chunk_length']} s gives {audio.chunk_frames} frames, but "
                              f"the encoder has {enc['max_source_positions']} positions (frames / 2)")
    decoder = llama_decoder_kwargs({**text, "attention_bias": False})
    decoder["qkv_bias"] = True  # Qwen2: biases on q, k and v, none on o
    audio_id = int(hf.get("audio_token_index", hf.get("audio_token_id", 151646)))
    return ModelConfig(
        name=folder.name, vision=None, audio=audio, fusion=FusionConfig(type="early"),
        decoder=DecoderConfig(**decoder),
        text=TextConfig(tokenizer="file", placeholder_tokens={"audio": placeholder_text(folder, audio_id, "<|AUDIO|>")},
                        placeholder_ids={"audio": audio_id}),
    )


def qwen2_audio_key_map() -> KeyMap:
    return [
        (r"(?:model\.)?audio_tower\.conv([12])\.(weight|bias)", r"encoders.audio.conv\1.\2"),
        (r"(?:model\.)?audio_tower\.embed_positions\.weight", "encoders.audio.embed_positions"),
        (r"(?:model\.)?audio_tower\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
         r"encoders.audio.layers.\1.self_attn.o_proj.\2"),
        (r"(?:model\.)?audio_tower\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)",
         r"encoders.audio.layers.\1.self_attn.\2.\3"),
        (r"(?:model\.)?audio_tower\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)",
         r"encoders.audio.layers.\1.layer_norm1.\2"),
        (r"(?:model\.)?audio_tower\.layers\.(\d+)\.final_layer_norm\.(weight|bias)",
         r"encoders.audio.layers.\1.layer_norm2.\2"),
        (r"(?:model\.)?audio_tower\.layers\.(\d+)\.(fc[12])\.(weight|bias)", r"encoders.audio.layers.\1.mlp.\2.\3"),
        (r"(?:model\.)?audio_tower\.layer_norm\.(weight|bias)", r"encoders.audio.layer_norm.\1"),
        (r"(?:model\.)?multi_modal_projector\.linear\.(weight|bias)", r"connectors.audio.linear.\1"),
        *llama_decoder_key_map("model.language_model."),
        *llama_decoder_key_map("language_model.model."),
        (r"language_model\.lm_head\.weight", "decoder.lm_head.weight"),
    ]


def load_qwen2_audio(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = qwen2_audio_config(hf, folder)
    model = build_on_meta(config)
    return load_mapped(model, folder, qwen2_audio_key_map(), device=device).eval()
