"""Training run configuration: a frozen dataclass read from YAML with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from omnifuse.config import ConfigError, config_from_dict, read_yaml

__all__ = ["TrainConfig", "load_train_config", "parse_overrides", "resolve_input_paths"]


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = "tiny-early"  # a preset name or a model config file (YAML/JSON)
    init_checkpoint: str = ""  # start from these weights (an omnifuse checkpoint folder)
    stage: str = "instruct"  # contrastive | align | instruct
    # align / instruct: also train the encoders: true (all), or a list of modalities whose encoders
    # learn (e.g. [audio, video]: those start from scratch while a pre-trained image encoder stays frozen)
    train_encoder: bool | tuple[str, ...] = False
    encoder_lr_scale: float = 1.0  # the encoders' learning rate relative to lr (align / instruct)
    contrastive_loss: str = "clip"  # clip (InfoNCE) | siglip
    # data
    data: str = "diagnostic"  # diagnostic | llava | captions
    data_path: str = ""  # llava: instruction JSON; captions: JSON / JSONL pairs
    image_folder: str = ""
    val_path: str = ""  # optional held-out file of the same format
    on_error: str = "skip"  # malformed records: skip (reported) | raise
    train_size: int = 20000  # diagnostic set sizes
    val_size: int = 300
    image_size: int = 64  # diagnostic images
    skills: tuple[str, ...] = ("colour", "shape", "spatial", "counting", "ocr", "compare")
    skill_weights: dict = field(default_factory=dict)  # training samples per skill, relative (default 1 each)
    max_length: int = 256
    truncation: str = "drop"  # rows that cannot be cut safely: drop (counted) | error
    # optimisation
    steps: int = 500
    batch_size: int = 16  # rows per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    clip_norm: float = 1.0
    # Mixture-of-experts layers (nn/moe.py): the load-balancing loss and the router z-loss, each
    # averaged over the MoE layers, added to the next-token loss with these weights (0: off).
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    seed: int = 0
    # bookkeeping
    out_dir: str = "runs/train"
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    log_seconds: float = 10.0  # off a terminal: a plain progress line at most this often
    max_new_tokens: int = 8  # answer length for accuracy evaluation
    distributed: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (parameters, gradients, optimizer sharded)
    # where and in which float type: bfloat16 and float16 are mixed precision, the weights,
    # gradients, optimizer state and loss staying float32 (training/precision.py)
    device: str = "cpu"  # cpu | cuda (under torchrun: each process the GPU of its local rank)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (cuda only)

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check(self.stage in ("contrastive", "align", "instruct"), f"stage must be contrastive, align or instruct, got {self.stage!r}")
        check(self.data in ("diagnostic", "llava", "captions"), f"data must be diagnostic, llava or captions, got {self.data!r}")
        check(self.data == "diagnostic" or bool(self.data_path), f"data {self.data!r} needs data_path")
        check(self.contrastive_loss in ("clip", "siglip"), f"contrastive_loss must be clip or siglip, got {self.contrastive_loss!r}")
        check(self.on_error in ("skip", "raise"), f"on_error must be skip or raise, got {self.on_error!r}")
        check(self.distributed in ("ddp", "fsdp"), f"distributed must be ddp or fsdp, got {self.distributed!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.encoder_lr_scale > 0, f"encoder_lr_scale must be positive, got {self.encoder_lr_scale}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        # One check for every entry point (omnifuse.runtime): cuda without a GPU torch can see and
        # float16 on a CPU are refused; bfloat16 on a CPU without native support warns.
        from omnifuse.runtime import choose_device, choose_dtype

        choose_dtype(self.dtype, choose_device(self.device))
        object.__setattr__(self, "skills", tuple(self.skills))
        if not isinstance(self.train_encoder, bool):
            from omnifuse.modalities import MODALITIES

            value = self.train_encoder
            chosen = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else (None,)
            check(all(m in MODALITIES for m in chosen), f"train_encoder must be true, false or a list of modalities {sorted(MODALITIES)}, "
                               f"got {self.train_encoder!r}")
            object.__setattr__(self, "train_encoder", chosen)
        if self.data == "diagnostic":
            from omnifuse.training.diagnostic import IMAGE_SKILLS

            media = [s for s in self.skills if s not in IMAGE_SKILLS]
            check(self.stage != "contrastive" or not media,
                  f"the contrastive stage pairs images with captions; skills {media} have no image")

    def encoder_groups(self) -> tuple[str, ...]:
        """The parameter groups (training/stages.py) ``train_encoder`` adds."""
        if self.train_encoder is True:
            return ("encoder",)
        return tuple(f"encoder.{m}" for m in self.train_encoder or ())


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings; values are parsed as YAML scalars (numbers, booleans, lists)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
    return out


# Settings that name files to read. Written in a config file they are relative to that file's folder
# (so a command works from any working directory); given as key=value they are relative to the
# working directory, as the user typed them. out_dir is an output and always follows the working
# directory.
INPUT_PATHS = ("model", "init_checkpoint", "data_path", "image_folder", "val_path")


def resolve_input_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with its relative input paths (INPUT_PATHS) taken relative to ``folder``. A model
    that names a preset, not a file, stays as it is."""
    out = dict(data)
    for key in INPUT_PATHS:
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        if key == "model" and not Path(value).suffix:
            continue  # a preset name
        out[key] = str(folder / value)
    return out


def load_train_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"training config not found: {p}")
        data = read_yaml(p, "training config") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of settings")
        data = resolve_input_paths(data, p.parent)
    data.update(parse_overrides(list(overrides)))
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown training settings {unknown}; known: {sorted(names)}")
    return config_from_dict(TrainConfig, data, "train")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
