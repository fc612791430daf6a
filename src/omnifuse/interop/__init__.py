"""Hugging Face checkpoint readers: a folder in HF layout becomes an omnifuse model."""

from __future__ import annotations

from pathlib import Path

from omnifuse.checkpoint import CheckpointError
from omnifuse.interop.hf import read_hf_config, stop_token_ids
from omnifuse.interop.llava import load_llava
from omnifuse.interop.mllama import load_mllama

__all__ = ["ARCHITECTURES", "is_hf_checkpoint", "load_hf_model"]

ARCHITECTURES = {"llava": load_llava, "mllama": load_mllama}


def is_hf_checkpoint(folder: str | Path) -> bool:
    try:
        return "model_type" in read_hf_config(folder)
    except CheckpointError:
        return False


def load_hf_model(folder: str | Path, device: str = "cpu"):
    """(model, stop token ids or None) for a HF folder; unsupported architectures are named."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{folder}/config.json names architecture {model_type!r} "
                              f"({', '.join(hf.get('architectures') or [])}), which omnifuse does not support; "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
    model = ARCHITECTURES[model_type](folder, hf, device)
    return model, stop_token_ids(folder, hf)
