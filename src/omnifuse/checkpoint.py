"""Checkpoints: ``config.json`` + ``model.safetensors`` (never pickle), loaded with named key checks."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_model

from omnifuse.config import ModelConfig, config_from_dict, config_to_dict
from omnifuse.errors import CheckpointError

__all__ = ["CheckpointError", "check_shapes", "load_checkpoint", "load_state_dict_checked", "materialize", "read_config",
           "safetensors_shapes", "save_checkpoint"]

FORMAT = "omnifuse"


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


def raise_if_mismatched(source: str, missing: list[str], unexpected: list[str], shapes: list[str],
                        sizes: tuple[int, int] | None = None) -> None:
    """One error naming every missing, unexpected and mis-shaped key (the first 20 of each), and
    ``sizes`` = (parameters the config describes, parameters the file holds) when known."""
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
        if keys:
            problems.append(f"{label} {keys[:20]}{f' ... ({len(keys)} in all)' if len(keys) > 20 else ''}")
    if problems:
        told = f" (the config describes {sizes[0]:,} parameters, the file holds {sizes[1]:,})" if sizes else ""
        raise CheckpointError(f"{source} does not fit the model{told}: " + "; ".join(problems))


def check_shapes(own: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped key of ``shapes`` (file key -> shape)
    against the model's ``own`` state dict; works on a model still on the meta device."""
    unexpected = [k for k in shapes if k not in own]
    mismatched = [f"{k}: file {shapes[k]} vs model {tuple(own[k].shape)}"
                  for k in shapes if k in own and shapes[k] != tuple(own[k].shape)]
    raise_if_mismatched(source, missing_keys(own, shapes), unexpected, mismatched,
                        (parameter_count(own), sum(math.prod(shape) for shape in shapes.values())))


def parameter_count(own: dict[str, torch.Tensor]) -> int:
    """Elements of a state dict, each shared (tied) tensor once."""
    return sum({id(t): t.numel() for t in own.values()}.values())


def load_state_dict_checked(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; raise naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict(keep_vars=True)
    check_shapes(own, {k: tuple(t.shape) for k, t in tensors.items()}, source)
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].data.copy_(t)


def materialize(model: torch.nn.Module, device: str | torch.device, what: str) -> torch.nn.Module:
    """Allocate a model built on the meta device, once it is known to fit in memory. Nothing is
    initialised: every tensor is about to come from a file."""
    from omnifuse.machine import ensure_fits, tensor_bytes

    ensure_fits(tensor_bytes(model), what, device)
    model = model.to_empty(device=device)
    from omnifuse.nn.rope import RotaryEmbedding

    for m in model.modules():
        if hasattr(m, "tie_weights"):
            m.tie_weights()  # to_empty gave tied parameters their own storage
        if isinstance(m, RotaryEmbedding):
            m.reset_buffers()  # buffers are not in the file
    return model


# Checkpoints written before the decoder became its own module, before one attention module served
# the vision encoder and before encoders were keyed by modality name their tensors differently;
# their keys are renamed on load.
_OLD_KEYS = ((re.compile(r"^(embed_tokens|layers|cross_layers|norm|lm_head)\."), r"decoder.\1."),
             (re.compile(r"^(vision_encoder\.layers\.\d+\.self_attn\.)out_proj\."), r"\1o_proj."),
             (re.compile(r"^vision_encoder\."), "encoders.image."), (re.compile(r"^connector\."), "connectors.image."))


def upgrade_key(key: str) -> str:
    """A tensor name from an omnifuse checkpoint of any version, in today's layout."""
    for pattern, repl in _OLD_KEYS:
        key = pattern.sub(repl, key)
    return key


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header; no tensor data is read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path}: {e}") from None


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
    """Build the model from ``config.json`` on the meta device, check it against the safetensors
    header (keys and shapes) and the free memory, then fill it one tensor at a time from the
    memory-mapped file, so a broken config costs nothing and the weights are never held twice."""
    from omnifuse.model import build_model

    folder = Path(folder)
    config = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    with torch.device("meta"):
        model = build_model(config)
    shapes = {upgrade_key(k): shape for k, shape in safetensors_shapes(weights).items()}
    check_shapes(model.state_dict(keep_vars=True), shapes, str(weights))
    model = materialize(model, device, f"the model in {folder}")
    own = model.state_dict(keep_vars=True)
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f, torch.no_grad():
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                own[upgrade_key(k)].data.copy_(f.get_tensor(k))
    except Exception as e:  # a file cut short after a valid header
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    return model.eval()
