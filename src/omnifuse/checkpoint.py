"""Checkpoints: ``config.json`` + ``model.safetensors`` (never pickle), loaded with named key checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_model

from omnifuse.config import ModelConfig, config_from_dict, config_to_dict

__all__ = ["CheckpointError", "load_checkpoint", "load_state_dict_checked", "read_config", "save_checkpoint"]

FORMAT = "omnifuse"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, or its tensors do not fit the model; names the keys."""


def save_checkpoint(model: torch.nn.Module, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": config_to_dict(model.config)}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_model(model, str(folder / "model.safetensors"))  # handles tied weights
    return folder


def missing_keys(own: dict[str, torch.Tensor], present) -> list[str]:
    """Model tensors nothing fills; tied parameters share one tensor and may be saved once."""
    groups: dict[int, list[str]] = {}
    for name, t in own.items():
        groups.setdefault(id(t), []).append(name)
    return [names[0] for names in groups.values() if not any(n in present for n in names)]


def raise_if_mismatched(source: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    """One error naming every missing, unexpected and mis-shaped key (the first 20 of each)."""
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
        if keys:
            problems.append(f"{label} {keys[:20]}{' ...' if len(keys) > 20 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def load_state_dict_checked(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; raise naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict(keep_vars=True)
    unexpected = [k for k in tensors if k not in own]
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape)]
    raise_if_mismatched(source, missing_keys(own, tensors), unexpected, shapes)
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].data.copy_(t)


def read_config_json(folder: str | Path):
    """``folder/config.json`` parsed, with errors naming the folder or file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return data


def read_config(folder: str | Path) -> ModelConfig:
    """The model config of an omnifuse checkpoint folder, without touching its weights."""
    meta = read_config_json(folder)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{Path(folder) / 'config.json'} is not an omnifuse checkpoint config "
                              f"(no \"format\": \"{FORMAT}\")")
    return config_from_dict(ModelConfig, meta.get("config", {}), "config")


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the model from ``config.json`` on the meta device and fill it from the memory-mapped
    safetensors file, so only one copy of the weights is ever held."""
    from omnifuse.model import build_model

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device=device)  # no random init: every tensor comes from the file
    model.tie_weights()
    model.rope.reset_buffers()
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    load_state_dict_checked(model, tensors, str(weights))
    return model.eval()
