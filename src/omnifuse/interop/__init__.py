"""Hugging Face checkpoint readers: a folder in HF layout becomes an omnifuse model."""

from __future__ import annotations

from pathlib import Path

from omnifuse.checkpoint import CheckpointError
from omnifuse.interop.blip2 import blip2_config, load_blip2
from omnifuse.interop.hf import read_hf_config, stop_token_ids
from omnifuse.interop.idefics import idefics_config, load_idefics
from omnifuse.interop.idefics3 import idefics3_config, load_idefics3
from omnifuse.interop.llama import llama_config, load_llama
from omnifuse.interop.llama4 import llama4_config, llama4_text_config, load_llama4, load_llama4_text
from omnifuse.interop.llava import llava_config, load_llava
from omnifuse.interop.llava_next_video import llava_next_video_config, load_llava_next_video
from omnifuse.interop.mistral import load_mistral, mistral_config
from omnifuse.interop.mllama import load_mllama, mllama_config
from omnifuse.interop.qwen2_audio import load_qwen2_audio, qwen2_audio_config

__all__ = ["ARCHITECTURES", "is_hf_checkpoint", "load_any_model", "load_hf_model", "read_any_config"]

ARCHITECTURES = {
    "blip-2": load_blip2,
    "idefics": load_idefics,
    "idefics3": load_idefics3,
    "instructblip": load_blip2,
    "llama": load_llama,
    "llama4": load_llama4,
    "llama4_text": load_llama4_text,
    "llava": load_llava,
    "llava_next_video": load_llava_next_video,
    "mistral": load_mistral,
    "mixtral": load_mistral,
    "mllama": load_mllama,
    "qwen2_audio": load_qwen2_audio,
    "smolvlm": load_idefics3,
}


def is_hf_checkpoint(folder: str | Path) -> bool:
    try:
        return "model_type" in read_hf_config(folder)
    except CheckpointError:
        return False


CONFIG_READERS = {
    "blip-2": blip2_config,
    "idefics": idefics_config,
    "idefics3": idefics3_config,
    "instructblip": blip2_config,
    "llama": llama_config,
    "llama4": llama4_config,
    "llama4_text": llama4_text_config,
    "llava": llava_config,
    "llava_next_video": llava_next_video_config,
    "mistral": mistral_config,
    "mixtral": mistral_config,
    "mllama": mllama_config,
    "qwen2_audio": qwen2_audio_config,
    "smolvlm": idefics3_config,
}


def _check_supported(folder: Path, hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{folder}/config.json names architecture {model_type!r} "
                              f"({', '.join(hf.get('architectures') or [])}), which omnifuse does not support; "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return model_type


def read_any_config(folder: str | Path):
    """The omnifuse ModelConfig of an omnifuse or Hugging Face checkpoint folder, weights untouched."""
    from omnifuse.checkpoint import read_config

    folder = Path(folder)
    if not is_hf_checkpoint(folder):
        return read_config(folder)
    hf = read_hf_config(folder)
    return CONFIG_READERS[_check_supported(folder, hf)](hf, folder)


def load_hf_model(folder: str | Path, device: str = "cpu"):
    """(model, stop token ids or None) for a HF folder; unsupported architectures are named."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    model = ARCHITECTURES[_check_supported(folder, hf)](folder, hf, device)
    return model, stop_token_ids(folder, hf)


def load_any_model(folder: str | Path):
    """An omnifuse or Hugging Face checkpoint as a plain (trainable, unpacked) model."""
    from omnifuse.checkpoint import load_checkpoint

    return load_hf_model(folder)[0] if is_hf_checkpoint(folder) else load_checkpoint(folder)
