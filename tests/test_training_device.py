"""Training device and dtype: the settings (YAML keys, key=value overrides, refusals) and runs in
mixed precision on the CPU and, where there is one, a GPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from omnifuse.errors import ConfigError
from omnifuse.training.config import TrainConfig, load_train_config
from omnifuse.training.loop import Trainer

TINY = dict(model="tiny-early", train_size=32, val_size=4, batch_size=4, steps=3, warmup_steps=1, lr=3e-3,
            max_length=128, skills=("colour", "shape"), image_size=64, max_new_tokens=2)


def test_device_and_dtype_are_yaml_keys_and_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("device: cpu\ndtype: bfloat16\n")
    cfg = load_train_config(str(path))
    assert (cfg.device, cfg.dtype) == ("cpu", "bfloat16")
    assert load_train_config(str(path), ["dtype=float32"]).dtype == "float32"  # the CLI's --dtype
    assert load_train_config(None, ["device=cpu"]).device == "cpu"  # the CLI's --device
    assert (TrainConfig().device, TrainConfig().dtype) == ("cpu", "float32")  # the CPU default stays float32


@pytest.mark.parametrize("overrides, message", [
    (["device=tpu"], "device must be one of cpu, cuda, got 'tpu'"),
    (["dtype=float64"], "dtype must be one of float32, bfloat16, float16, got 'float64'"),
    (["dtype=float16"], "dtype float16 is not supported on the CPU"),  # the default device is the CPU
    (["device=cpu", "dtype=float16"], "dtype float16 is not supported on the CPU"),
])
def test_unusable_device_or_dtype_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_cuda_without_a_gpu_is_refused_naming_the_problem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device cuda was asked for but torch sees no CUDA GPU"):
        load_train_config(None, ["device=cuda"])


def _losses(out_dir) -> list[float]:
    lines = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_bfloat16_trains_on_cpu_with_finite_loss_and_float32_state(tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(TrainConfig(**{**TINY, "dtype": dtype, "out_dir": str(tmp_path / dtype)}), quiet=True)
        result = trainer.run()
        runs[dtype] = _losses(tmp_path / dtype)
        assert len(runs[dtype]) == 3 and all(math.isfinite(x) for x in runs[dtype])
        assert math.isfinite(result["val_loss"])
        # Mixed precision: weights and AdamW's moments stay float32, so the checkpoint is too.
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
        moments = [t for s in trainer.optimizer.state.values() for k, t in s.items() if k.startswith("exp_avg")]
        assert moments and {t.dtype for t in moments} == {torch.float32}
    assert runs["bfloat16"] != runs["float32"]  # the forward passes did run in bfloat16 ...
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        assert abs(a - b) < 0.05 * a  # ... and give about the float32 losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_on_cuda_matches_the_cpu(tmp_path, dtype):
    cpu = Trainer(TrainConfig(**{**TINY, "out_dir": str(tmp_path / "cpu")}), quiet=True)
    cpu.run()
    gpu = Trainer(TrainConfig(**{**TINY, "device": "cuda", "dtype": dtype, "out_dir": str(tmp_path / "gpu")}),
                  quiet=True)
    assert gpu.model.device.type == "cuda"
    result = gpu.run()
    assert math.isfinite(result["val_loss"])
    tolerance = 1e-2 if dtype == "float32" else 0.05  # float32 (cuDNN convolutions may use TF32), mixed
    for a, b in zip(_losses(tmp_path / "cpu"), _losses(tmp_path / "gpu")):
        assert math.isfinite(b) and abs(a - b) < tolerance * a
    # The checkpoint it wrote resumes on the GPU: a longer run continues from step 3.
    longer = Trainer(TrainConfig(**{**TINY, "steps": 4, "device": "cuda", "dtype": dtype,
                                    "out_dir": str(tmp_path / "gpu")}), quiet=True)
    longer.run()
    assert len(_losses(tmp_path / "gpu")) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_contrastive_stage_trains_on_cuda(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY, "stage": "contrastive", "batch_size": 8, "device": "cuda",
                                     "dtype": "bfloat16", "out_dir": str(tmp_path)}), quiet=True)
    assert all(math.isfinite(trainer.train_step(s)) for s in range(2))
