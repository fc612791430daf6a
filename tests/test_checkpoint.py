"""Checkpoints (omnifuse.checkpoint): config.json + model.safetensors, exact round trips, named key checks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from omnifuse.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from omnifuse.config import ConfigError
from omnifuse.modalities import build_image_processor
from omnifuse.model import build_model
from omnifuse.presets import get_preset

TINY = ["tiny-early", "tiny-cross"]
IMAGE = 259  # the byte tokenizer's <image>
TEXT = torch.tensor([[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])  # <s>Hello, world
IMG = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8))


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_preset(name)).eval()


def randomise_gates(model) -> None:
    """Fresh cross-attention gates are zero (identity); make them count so logits depend on them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate.gate"):  # attn_gate.gate, mlp_gate.gate (not mlp.gate_proj)
                p.uniform_(-1.0, 1.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, checkpoint folder) for each tiny preset."""
    out = {}
    for name in TINY:
        model = tiny_model(name)
        randomise_gates(model)
        folder = tmp_path_factory.mktemp(name)
        save_checkpoint(model, folder)
        out[name] = (model, folder)
    return out


def rewrite_weights(src, dst, edit) -> None:
    """Copy checkpoint ``src`` to ``dst`` with ``edit(tensors)`` applied to its weights."""
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_round_trip_gives_identical_tensors(saved, name):
    model, folder = saved[name]
    loaded = load_checkpoint(folder)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("name", TINY)
def test_round_trip_gives_identical_logits(saved, name):
    model, folder = saved[name]
    loaded = load_checkpoint(folder)
    assert not loaded.training  # ready for inference
    with torch.no_grad():
        want, got = model(TEXT), loaded(TEXT)
    assert got.shape == (1, TEXT.shape[1], get_preset(name).decoder.vocab_size)
    assert torch.equal(got, want)
    # The model was really filled from the file: a fresh random model of the same preset differs.
    with torch.no_grad():
        assert not torch.equal(tiny_model(name, seed=1)(TEXT), want)


@pytest.mark.parametrize("name", TINY)
def test_round_trip_gives_identical_logits_with_an_image(saved, name):
    model, folder = saved[name]
    loaded = load_checkpoint(folder)
    processed = build_image_processor(get_preset(name))(IMG)
    slots = loaded.fusion.placeholder_tokens(processed.num_tokens)  # early fusion: one slot per visual token
    ids = torch.tensor([[257] + [IMAGE] * slots + [72, 105]])
    with torch.no_grad():
        outs = []
        for m in (model, loaded, tiny_model(name, seed=1)):
            outs.append(m(ids, images=[[processed]]))
    assert torch.equal(outs[1], outs[0])
    assert not torch.equal(outs[2], outs[0])


@pytest.mark.parametrize("name", TINY)
def test_loaded_model_processes_images(saved, name):
    loaded = load_checkpoint(saved[name][1])
    got = loaded.image_processor(IMG)
    want = build_image_processor(get_preset(name))(IMG)
    assert torch.equal(got.pixel_values, want.pixel_values)


def test_round_trip_keeps_cross_attention_gates(saved):
    _, folder = saved["tiny-cross"]
    loaded = load_checkpoint(folder)
    gates = {k: v for k, v in loaded.state_dict().items() if k.endswith("_gate.gate")}
    assert gates, "tiny-cross has gated cross-attention layers"
    assert all(bool(v.abs().sum() > 0) for v in gates.values())  # the non-zero gates came back


@pytest.mark.parametrize("name", TINY)
def test_round_trip_keeps_the_config(saved, name):
    _, folder = saved[name]
    assert load_checkpoint(folder).config == get_preset(name)
    assert read_config(folder) == get_preset(name)


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_is_config_json_and_safetensors_only(saved, name):
    _, folder = saved[name]
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt") for p in folder.rglob("*"))
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "omnifuse"
    assert meta["config"]["name"] == name


def test_save_creates_missing_parent_folders(tmp_path):
    folder = tmp_path / "runs" / "a" / "ckpt"
    assert save_checkpoint(tiny_model("tiny-early"), folder) == folder
    assert (folder / "model.safetensors").is_file()


def test_read_config_works_without_weights(saved, tmp_path):
    _, folder = saved["tiny-cross"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert read_config(tmp_path) == get_preset("tiny-cross")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_round_trip_with_tied_embeddings(tmp_path):
    cfg = get_preset("tiny-early")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_embeddings=True))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(TEXT), model(TEXT))


# --- weights that do not fit -----------------------------------------------------------------


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved["tiny-early"]
    key = "decoder.layers.2.self_attn.o_proj.weight"
    assert key in load_file(str(folder / "model.safetensors"))
    rewrite_weights(folder, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "missing" in msg and key in msg
    assert "unexpected" not in msg


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, folder = saved["tiny-cross"]
    key = "decoder.cross_layers.2.attn_gate.gate"  # tiny-cross has cross layers 1 and 3 only

    def add(t):
        t[key] = torch.zeros(1)

    rewrite_weights(folder, tmp_path, add)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "unexpected" in msg and key in msg
    assert "missing" not in msg


def test_mis_shaped_tensor_names_key_and_both_shapes(saved, tmp_path):
    _, folder = saved["tiny-early"]
    key = "decoder.embed_tokens.weight"  # (260, 128) in the model

    def shrink(t):
        t[key] = t[key][:200].clone()

    rewrite_weights(folder, tmp_path, shrink)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert key in msg
    assert "(200, 128)" in msg and "(260, 128)" in msg


def test_weights_of_another_preset_do_not_load(saved, tmp_path):
    # tiny-early's config.json with tiny-cross's tensors: every difference is reported at once.
    (tmp_path / "config.json").write_text((saved["tiny-early"][1] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((saved["tiny-cross"][1] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "unexpected" in msg and "cross_layers.1." in msg
    assert "missing" in msg and "connectors.image." in msg


# --- broken folders --------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found") as err:
        load_checkpoint(tmp_path / "nope")
    assert "nope" in str(err.value)


def test_missing_config_json(saved, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((saved["tiny-early"][1] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [
    json.dumps({"model_type": "llava", "vocab_size": 32064}),  # a Hugging Face config.json
    json.dumps([1, 2, 3]),
    json.dumps({"format": "other", "config": {}}),
])
def test_non_omnifuse_config_json(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="not an omnifuse checkpoint config"):
        read_config(tmp_path)


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("format: omnifuse\n")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(tmp_path)


def test_invalid_config_inside_a_checkpoint_names_the_field(saved, tmp_path):
    meta = json.loads((saved["tiny-early"][1] / "config.json").read_text())
    meta["config"]["decoder"]["num_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="num_heads"):
        read_config(tmp_path)


@pytest.mark.parametrize("content", [b"\x00garbage bytes, not a safetensors file" * 4, b"\xff" * 7])
def test_corrupt_safetensors_file(saved, tmp_path, content):
    (tmp_path / "config.json").write_text((saved["tiny-early"][1] / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_checkpoint(tmp_path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


_BROKEN_CONFIG_SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
from safetensors.torch import save_file
from hf_fixtures import save_llava, save_mllama
from omnifuse.cli import main

root = Path(sys.argv[2])
cases = {}
folder = root / "empty-config"
folder.mkdir()
(folder / "config.json").write_text(json.dumps({"format": "omnifuse", "config": {}}))  # a 7B-sized default
save_file({"x": torch.zeros(3)}, str(folder / "model.safetensors"))
cases["empty-config"] = folder
for name, save in (("llava", save_llava), ("mllama", save_mllama)):
    base = save(root / name)
    for case in ("no-text-config", "huge-vocab"):
        folder = root / f"{name}-{case}"
        folder.mkdir()
        for f in base.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((folder / "config.json").read_text())
        if case == "no-text-config":
            del cfg["text_config"]  # Llama defaults: 4096 wide, 32 layers
        else:
            cfg["text_config"]["vocab_size"] = 50_000_000
        (folder / "config.json").write_text(json.dumps(cfg))
        cases[f"{name}-{case}"] = folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, folder in cases.items():
    code = main(["generate", "--checkpoint", str(folder), "--prompt", "hi", "--max-new-tokens", "1"])
    print(name, code, flush=True)
print("peak_kib", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_broken_configs_are_refused_before_anything_is_allocated(tmp_path):
    # Each config describes billions of parameters next to a tiny file: the keys and shapes are
    # checked on the meta device, so the refusal costs no memory (a child process reports its peak).
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", _BROKEN_CONFIG_SCRIPT, str(tests), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("\n")
    results = dict(line.split() for line in lines if line and not line.startswith("peak_kib"))
    assert set(results) == {"empty-config", "llava-no-text-config", "llava-huge-vocab", "mllama-no-text-config",
                            "mllama-huge-vocab"}
    assert set(results.values()) == {"1"}
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("omnifuse: error:")]
    assert len(errors) == 5 and all("does not fit the model (the config describes" in e for e in errors), errors
    assert "Traceback" not in proc.stderr
    before, peak = (int(v) for v in lines[-2].split()[1:])
    assert peak - before < 500 * 1024, f"peak RSS grew by {(peak - before) // 1024} MiB"


def test_a_model_larger_than_memory_is_refused_with_the_estimate(monkeypatch, capsys):
    from omnifuse import machine
    from omnifuse.cli import main

    monkeypatch.setattr(machine, "available_memory", lambda: 8 * machine.GIB)
    assert main(["generate", "--preset", "llava-1.5-7b", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "preset 'llava-1.5-7b' (7,050,828,800 float32 parameters) needs about 26.3 GiB" in err
    assert "8.0 GiB of memory available" in err
    assert main(["generate", "--preset", "tiny-early", "--prompt", "hi", "--max-new-tokens", "1"]) == 0


def test_training_state_larger_than_memory_is_refused(monkeypatch, capsys, tmp_path):
    from omnifuse import machine
    from omnifuse.cli import main

    monkeypatch.setattr(machine, "available_memory", lambda: 1024 * 1024)  # 1 MiB
    assert main(["train", "model=tiny-early", "steps=1", f"out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "training tiny-early" in err and "x 4 for training" in err and "1.0 MiB of memory available" in err
    assert not (tmp_path / "checkpoints").exists()


def test_available_memory_is_read_from_the_machine():
    from omnifuse.machine import available_memory

    free = available_memory()
    assert free is None or free > 0


def test_checkpoint_with_the_earlier_key_layout_loads(saved, tmp_path):
    # Checkpoints written before the decoder was a module of its own name its tensors without the
    # "decoder." prefix, and the ViT's attention output "out_proj"; they load to the same model.
    import re

    for name in TINY:
        model, folder = saved[name]

        def old_layout(t):
            for k in list(t):
                old = re.sub(r"^decoder\.", "", k)
                old = re.sub(r"^encoders\.image\.", "vision_encoder.", old)
                old = re.sub(r"^connectors\.image\.", "connector.", old)
                old = re.sub(r"^(vision_encoder\.layers\.\d+\.self_attn\.)o_proj\.", r"\1out_proj.", old)
                t[old] = t.pop(k)

        dst = tmp_path / name
        rewrite_weights(folder, dst, old_layout)
        assert "embed_tokens.weight" in load_file(str(dst / "model.safetensors"))
        loaded = load_checkpoint(dst)
        image = build_image_processor(model.config)(IMG)
        ids = torch.cat([TEXT[:, :3], torch.full((1, model.fusion.placeholder_tokens(image.num_tokens)), IMAGE), TEXT[:, 3:]], 1)
        with torch.no_grad():
            assert torch.equal(loaded(ids, images=[[image]]), model(ids, images=[[image]]))
