"""Training checkpoints: model, optimizer, schedule, RNG and data position, written atomically.

Layout: ``out_dir/checkpoints/step-000100/`` holding ``config.json`` + ``model.safetensors`` (an
ordinary omnifuse checkpoint), ``optimizer.safetensors`` (every tensor of the optimizer state),
``trainer.json`` (step, schedule, optimizer scalars, Python RNG state, float16's loss scale), and
``rng.safetensors`` (torch's RNG states: the CPU's, and the GPU's when the model is on one). A
checkpoint is written into a temporary folder and renamed into place; the ``latest`` file naming
it is replaced atomically after that, so a kill at any moment leaves the previous checkpoint
intact. No pickle anywhere.

A sharded (FSDP) run writes the same folder, its model gathered into ``model.safetensors`` (an
ordinary checkpoint, for inference and for evaluation), and the shards of the model and the
optimizer state through ``torch.distributed.checkpoint`` into ``dcp/``, every process its own,
in place of ``optimizer.safetensors``; a resumed run reads its shards back from there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from omnifuse.checkpoint import CheckpointError, load_state_dict_checked, save_checkpoint, upgrade_key

__all__ = ["latest_checkpoint", "load_sharded_training_state", "load_training_state", "save_sharded_training_state",
           "save_training_state"]


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in scalars["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_training_state(out_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2,
                        scaler: torch.amp.GradScaler | None = None, tmp: Path | None = None) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it, keeping the newest ``keep``.
    ``scaler``: float16 training's loss scale, part of an exact resume. ``tmp``: the folder being
    written, when the sharded state is in it already (``optimizer`` is then None)."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    if tmp is None:
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp)
    scalars = None
    if optimizer is not None:
        tensors, scalars = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    device = next(model.parameters()).device
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    trainer = {"step": step, "scheduler": scheduler.state_dict(), **({"optimizer": scalars} if scalars else {}),
               "python_rng": [py_state[0], list(py_state[1]), py_state[2]], **extra}
    if scaler is not None:
        trainer["grad_scaler"] = scaler.state_dict()
    (tmp / "trainer.json").write_text(json.dumps(trainer))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p != final)[:-max(keep - 1, 0) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_training_state(out_dir: Path, step: int, model, plain_model, optimizer, scheduler, extra: dict,
                                world, keep: int = 2, scaler: torch.amp.GradScaler | None = None) -> None:
    """Every process of a sharded run: write its shards of the model and optimizer state into
    checkpoint ``step``'s ``dcp/``; rank 0 adds ``plain_model`` (the gathered model) and the rest
    as ``save_training_state`` does, then renames the folder into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step:06d}-sharded"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "dcp"))
    world.barrier()
    if world.main:
        save_training_state(out_dir, step, plain_model, None, scheduler, extra, keep, scaler, tmp=tmp)
    world.barrier()


def load_sharded_training_state(path: Path, model, optimizer, scheduler,
                                scaler: torch.amp.GradScaler | None = None) -> dict:
    """Every process of a sharded run: restore what ``save_sharded_training_state`` wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / "dcp").is_dir():
        raise CheckpointError(f"{path} holds no sharded state (dcp/): it was written by an unsharded run; "
                              "resume it with distributed: ddp, or start a new out_dir")
    trainer = json.loads((path / "trainer.json").read_text())
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _restore_rest(path, trainer, model, scheduler, scaler)
    return trainer


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete training checkpoint")
    return path


def load_training_state(path: Path, model, optimizer, scheduler, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restore everything ``save_training_state`` wrote; returns trainer.json's contents."""
    trainer = json.loads((path / "trainer.json").read_text())
    if not (path / "optimizer.safetensors").is_file():
        raise CheckpointError(f"{path} holds a sharded optimizer state (dcp/): it was written by an FSDP run; "
                              "resume it with distributed: fsdp under torchrun")
    tensors = {upgrade_key(k): t for k, t in load_file(str(path / "model.safetensors")).items()}
    load_state_dict_checked(model, tensors, str(path / "model.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), trainer["optimizer"]))
    _restore_rest(path, trainer, model, scheduler, scaler)
    return trainer


def _restore_rest(path: Path, trainer: dict, model, scheduler, scaler) -> None:
    """The schedule, the loss scale and the RNG states of a checkpoint."""
    scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and trainer.get("grad_scaler"):
        scaler.load_state_dict(trainer["grad_scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    device = next(model.parameters()).device
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    version, internal, gauss = trainer["python_rng"]
    random.setstate((version, tuple(internal), gauss))
