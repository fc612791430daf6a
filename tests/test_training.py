"""Training: answer-only loss, truncation, losses, stages, exact resume, several processes, data formats."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scene

from omnifuse.training.collate import ExampleBuilder, TruncationError, collate, length_groups
from omnifuse.training.config import TrainConfig, load_train_config
from omnifuse.training.llava_data import DataFormatError
from omnifuse.training.loop import Trainer
from omnifuse.training.losses import IGNORE, clip_loss, next_token_loss, siglip_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny-early", train_size=200, val_size=12, batch_size=4, steps=6, warmup_steps=2, lr=3e-3,
            max_length=128, skills=("colour", "shape"), image_size=64)


def _builder(cross=False, max_length=512, truncation="drop"):
    from omnifuse.presets import get_preset
    from omnifuse.processing.prompt import PromptLayout
    from omnifuse.processing.text import ByteTokenizer

    layout = PromptLayout.for_model(get_preset("tiny-cross" if cross else "tiny-early"), ByteTokenizer())
    return ExampleBuilder(layout, max_length=max_length, truncation=truncation)


def _image(n_tokens=16):
    from omnifuse.processing.image import ProcessedImage

    return ProcessedImage(torch.zeros(1, 3, 32, 32), n_tokens, (4, 4), (1, 1), (32, 32))


def test_only_assistant_tokens_carry_loss_and_images_expand():
    b = _builder()
    turns = [("user", "what colour?"), ("assistant", "red"), ("user", "and now?"), ("assistant", "blue")]
    ex = b.build(turns, [_image(16)])
    tok = b.tokenizer
    answer_ids = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert tok.decode(answer_ids, skip_special_tokens=False).startswith("red</s>")
    assert "blue</s>" in tok.decode(answer_ids, skip_special_tokens=False)
    assert "what colour" not in tok.decode(answer_ids)
    assert ex.input_ids.count(tok.image_token_id) == 16  # early fusion: one slot per visual token
    assert all(lab == IGNORE for i, lab in zip(ex.input_ids, ex.labels) if i == tok.image_token_id)
    cross = _builder(cross=True).build(turns, [_image(16)])
    assert cross.input_ids.count(tok.image_token_id) == 1
    batch = collate([ex, cross], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.input_ids))
    assert batch["attention_mask"][1].sum() == len(cross.input_ids)
    assert (batch["labels"][1, len(cross.input_ids):] == IGNORE).all()


def test_truncation_never_cuts_a_media_span():
    turns = [("user", "<image>describe"), ("assistant", "a long answer " * 4)]
    b = _builder(max_length=40)  # the 64 image tokens alone do not fit
    assert b.build(turns, [_image(64)]) is None and b.dropped == 1
    with pytest.raises(TruncationError, match="exceeds max_length 40.*image"):
        _builder(max_length=40, truncation="error").build(turns, [_image(64)])
    ok = _builder(max_length=100).build(turns, [_image(64)])  # cut inside the answer: kept, shortened
    assert ok is not None and len(ok.input_ids) == 100 and any(lab != IGNORE for lab in ok.labels)


def test_losses_match_their_definitions():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, :3] = IGNORE
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(next_token_loss(logits, labels), manual)
    img, txt, scale = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.0)
    sim = scale.exp() * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    target = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(sim, target) + torch.nn.functional.cross_entropy(sim.t(), target)) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale), expected)
    bias = torch.tensor(-1.0)
    z = sim + bias
    manual_sig = sum(-torch.nn.functional.logsigmoid(z[i, j] if i == j else -z[i, j]) for i in range(4) for j in range(4)) / 4
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias), manual_sig)
    # A matched batch has lower loss than a shuffled one.
    assert clip_loss(img, img, scale) < clip_loss(img, img.roll(1, 0), scale)


def test_align_stage_trains_only_connector_and_fusion(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY, "model": "tiny-cross", "stage": "align", "out_dir": str(tmp_path)}), quiet=True)
    assert set(trainer.trainable) == {"connector", "fusion"}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step(0)
    for n, p in trainer.model.named_parameters():
        changed = not torch.equal(before[n], p)
        if n.startswith(("connectors.", "decoder.cross_layers.")):
            assert p.requires_grad, n
        else:
            assert not p.requires_grad and not changed, f"{n} is frozen in the align stage but changed"
    for prefix in ("connectors.", "decoder.cross_layers."):  # both trainable groups actually moved
        assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n.startswith(prefix))


def test_encoder_learns_at_its_own_scaled_rate(tmp_path):
    from omnifuse.config import ConfigError

    cfg = TrainConfig(**{**TINY, "train_encoder": True, "encoder_lr_scale": 0.1, "out_dir": str(tmp_path)})
    trainer = Trainer(cfg, quiet=True)
    encoder = {id(p) for p in trainer.model.vision_encoder.parameters()}
    base = {}
    for group in trainer.optimizer.param_groups:
        kinds = {id(p) in encoder for p in group["params"]}
        assert len(kinds) == 1  # a group is all encoder or all not
        base["encoder" if kinds.pop() else "rest"] = group["initial_lr"]
    assert base == {"encoder": pytest.approx(0.1 * cfg.lr), "rest": pytest.approx(cfg.lr)}
    grouped = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        TrainConfig(**{**TINY, "encoder_lr_scale": 0})


def _losses(path: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in path.read_text().splitlines() if "loss" in json.loads(ln)]


def _run_cli(args: list[str], env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "omnifuse", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(list(v)) if isinstance(v, tuple) else v}" for k, v in d.items()]


# `omnifuse train` in a process that dies (os._exit: no cleanup, no buffers written) as step
# argv[1] + 1 begins, as if killed there: the run has logged and checkpointed steps 1 .. argv[1].
_KILLED = """
import os, sys
from omnifuse.cli import main
from omnifuse.training.loop import Trainer

after = int(sys.argv.pop(1))
train_step = Trainer.train_step

def train_step_or_die(self, step):
    if step == after:
        sys.stdout.flush()
        os._exit(17)
    return train_step(self, step)

Trainer.train_step = train_step_or_die
sys.exit(main(sys.argv[1:]))
"""


def _run_killed_after(steps: int, args: list[str]):
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(steps), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    settings = {**TINY, "steps": 12, "checkpoint_every": 4, "eval_every": 0}
    _run_cli(["train", *_overrides({**settings, "out_dir": tmp_path / "whole"})])
    _run_killed_after(6, ["train", *_overrides({**settings, "out_dir": tmp_path / "cut"})])
    # killed after step 6: the last checkpoint is step 4
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-000004"
    (tmp_path / "cut" / "checkpoints" / ".tmp-step-000008-1").mkdir()  # a half-written checkpoint is ignored
    _run_cli(["train", *_overrides({**settings, "out_dir": tmp_path / "cut"})])
    whole, resumed = _losses(tmp_path / "whole" / "metrics.jsonl"), _losses(tmp_path / "cut" / "metrics.jsonl")
    assert len(whole) == len(resumed) == 12
    assert resumed == whole  # bit-for-bit: same data order, RNG, optimizer and schedule state


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found")
    settings = {**TINY, "steps": 3}
    _run_cli(["train", *_overrides({**settings, "batch_size": 8, "out_dir": tmp_path / "one"})])
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29613", "-m", "omnifuse", "train",
                           *_overrides({**settings, "batch_size": 4, "out_dir": tmp_path / "two"})],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "step-000003" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-000003" / "model.safetensors"))
    # Each process groups its own rows by length, so the float summation order differs; AdamW's
    # first steps turn such noise in near-zero gradients into updates of up to ~1e-5. A real
    # mistake (a gradient averaged wrongly, a row seen twice) moves weights by ~lr = 3e-3.
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3, msg=k)


def test_train_on_llava_format_folder_reports_bad_records(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        scene(40, 40, i).save(images / f"{i}.png")
    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                                      {"from": "gpt", "value": "a scene"}]} for i in range(3)]
    records.append({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                               {"from": "gpt", "value": "x"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: tiny-early\ndata: llava\ndata_path: {tmp_path / 'data.json'}\nimage_folder: {images}\n"
                   f"steps: 2\nbatch_size: 2\nwarmup_steps: 0\nout_dir: {tmp_path / 'run'}\n")
    proc = _run_cli(["train", "--config", str(cfg)])
    assert "record 3" in proc.stderr and "missing.png" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    proc = _run_cli(["train", "--config", str(cfg), "on_error=raise", f"out_dir={tmp_path / 'run2'}"], check=False)
    assert proc.returncode == 1 and "record 3" in proc.stderr and "Traceback" not in proc.stderr


def test_train_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: tiny-cross\nsteps: 7\n")
    cfg = load_train_config(str(path), ["lr=0.01", "skills=[colour, ocr]"])
    assert (cfg.model, cfg.steps, cfg.lr, cfg.skills) == ("tiny-cross", 7, 0.01, ("colour", "ocr"))
    from omnifuse.config import ConfigError

    with pytest.raises(ConfigError, match="unknown training settings.*stepz"):
        load_train_config(str(path), ["stepz=3"])
    with pytest.raises(ConfigError, match="stage"):
        load_train_config(None, ["stage=pretrain"])
    for name in sorted(p.name for p in (ROOT / "configs").glob("train-*.yaml")):
        load_train_config(str(ROOT / "configs" / name), ["data_path=x.json"])  # the shipped configs are valid
    with pytest.raises(ConfigError, match="data 'captions' needs data_path"):
        load_train_config(str(ROOT / "configs" / "train-llava-align.yaml"))  # the user names the data


def test_contrastive_stage_lowers_its_loss(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY, "stage": "contrastive", "batch_size": 16, "steps": 30, "lr": 3e-3,
                                      "out_dir": str(tmp_path)}), quiet=True)
    assert set(trainer.trainable) == {"encoder"}
    losses = [trainer.train_step(s) for s in range(30)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.slow
def test_arena_quick_writes_report_and_plots(tmp_path):
    proc = _run_cli(["arena", "--quick", "--seeds", "2", "--out-dir", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "the mean over 2 training seeds (0, 1)" in report and "## What the intervals show" in report
    from omnifuse.training.diagnostic import SKILLS, chance_level

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["skills"] == list(SKILLS)  # image, audio, video and audio-visual skills
    assert results["chance"] == {s: chance_level(s) for s in SKILLS}
    chance_row = next(line for line in report.splitlines() if line.startswith("| *chance*"))
    assert "20.0%" in chance_row and "33.3%" in chance_row  # beeps (5 answers), order / flash (3 shapes)
    assert "the audio and video encoders trained from scratch" in report
    assert (tmp_path / "accuracy_per_skill.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_kv_cache.png").stat().st_size > 1000
    assert results["pretrain_steps"] == 15  # as run: --quick pre-trains for half its 30 steps, not the config's 300
    assert "pre-trained contrastively for 15 steps" in report
    early, cross = results["strategies"]
    assert results["seeds"] == [0, 1] and len(early["accuracy_runs"]) == 2 and early["count"] == 2 * results["test_size"]
    assert early["visual_tokens_per_image"] == cross["visual_tokens_per_image"] == 64
    assert early["audio_tokens_per_second"] == cross["audio_tokens_per_second"] == 20
    assert early["video_tokens_per_frame"] == cross["video_tokens_per_frame"] == 16
    assert "| audio tokens / s | video tokens / frame |" in report
    assert early["context_tokens_per_sample"] - cross["context_tokens_per_sample"] > 60  # visual tokens in context
    assert early["kv_cache_bytes_per_sample"] > cross["kv_cache_bytes_per_sample"]
    assert "chance" in proc.stdout


@pytest.mark.parametrize("case", ["train-yaml", "override", "model-yaml", "arena-yaml", "not-utf8"])
def test_invalid_yaml_is_one_error_line(tmp_path, capsys, case):
    from omnifuse.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\nlr: 0.1\n")
    good = tmp_path / "t.yaml"
    good.write_text(f"model: tiny-early\nsteps: 1\nout_dir: {tmp_path / 'run'}\n")
    argv, expect = {
        "train-yaml": (["train", "--config", str(bad)], "bad.yaml is not valid YAML (line"),
        "override": (["train", "--config", str(good), "lr=[1,"], "override 'lr=[1,': the value is not valid YAML"),
        "model-yaml": (["train", "--config", str(good), f"model={bad}"], "model config"),
        "arena-yaml": (["arena", "--config", str(bad)], "arena config"),
        "not-utf8": (["train", "--config", str(good), f"model={tmp_path / 'm.yaml'}"], "cannot read model config"),
    }[case]
    (tmp_path / "m.yaml").write_bytes(b"\xff\xfe\x00bad")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("omnifuse: error:") and err.count("\n") == 1 and expect in err, err


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "cfgs"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "m.yaml").write_text((ROOT / "configs" / "models" / "arena-early.yaml").read_text())
    (folder / "t.yaml").write_text("model: models/m.yaml\ndata: captions\ndata_path: data/pairs.jsonl\n"
                                   "image_folder: data/images\nout_dir: runs/x\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config("cfgs/t.yaml", ["val_path=v.jsonl"])
    assert cfg.model == str(Path("cfgs/models/m.yaml"))
    assert (cfg.data_path, cfg.image_folder) == (str(Path("cfgs/data/pairs.jsonl")), str(Path("cfgs/data/images")))
    assert cfg.val_path == "v.jsonl"  # a key=value override is relative to the working directory
    assert cfg.out_dir == "runs/x"  # outputs follow the working directory
    assert load_train_config("cfgs/t.yaml", ["model=tiny-cross"]).model == "tiny-cross"  # a preset name


def _llava_folder(tmp_path, corrupt: int | None = None) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        scene(40, 40, i).save(images / f"{i}.png")
    if corrupt is not None:
        (images / f"{corrupt}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                                      {"from": "gpt", "value": "a scene"}]} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def test_undecodable_image_is_skipped_and_named_or_stops_the_run(tmp_path):
    folder = _llava_folder(tmp_path, corrupt=2)
    settings = ["model=tiny-early", "data=llava", f"data_path={folder / 'data.json'}", f"image_folder={folder / 'images'}",
                "steps=3", "batch_size=2", "warmup_steps=0", "max_new_tokens=2"]
    proc = _run_cli(["train", *settings, f"out_dir={tmp_path / 'skip'}"])
    assert proc.stderr.count("skipped record 2:") == 1 and "cannot decode image" in proc.stderr  # named once
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["skipped_media"] == 1 and result["loss"] > 0
    assert (tmp_path / "skip" / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    proc = _run_cli(["train", *settings, "on_error=raise", f"out_dir={tmp_path / 'raise'}"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "record 2: cannot decode image" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_run_without_a_usable_row_fails_and_writes_nothing(tmp_path):
    # 64 visual tokens per image cannot fit max_length 40: every row is dropped.
    proc = _run_cli(["train", *_overrides({**TINY, "steps": 2, "max_length": 40, "out_dir": tmp_path})], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no training step had a usable row" in proc.stderr and "exceeds max_length 40" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    # A longer run stops after one epoch of unusable records instead of running on.
    trainer = Trainer(TrainConfig(**{**TINY, "train_size": 16, "max_length": 40, "out_dir": str(tmp_path)}), quiet=True)
    assert math.isnan(trainer.train_step(0))
    with pytest.raises(DataFormatError, match="a whole epoch \\(16 records\\) gave no usable training row"):
        for step in range(1, 4):
            trainer.train_step(step)


def test_progress_off_a_terminal_is_plain_lines_and_a_resume_says_its_step(tmp_path):
    settings = {**TINY, "steps": 6, "checkpoint_every": 3, "out_dir": tmp_path}
    killed = _run_killed_after(4, ["train", *_overrides(settings)])
    lines = [ln for ln in killed.stdout.splitlines() if ln.startswith("train instruct: step")]
    assert lines[0].startswith("train instruct: step 1/6 loss ") and "step/s" in lines[0] and "ETA" in lines[0]
    assert "nan" not in killed.stdout and "━" not in killed.stdout  # no bar redraws in a log file
    resumed = _run_cli(["train", *_overrides(settings)])
    assert "resuming" in resumed.stdout and "from step 3 of 6" in resumed.stdout
    assert any(ln.startswith("train instruct: step 6/6") for ln in resumed.stdout.splitlines())


def test_progress_bar_shows_no_loss_before_the_first_step():
    from io import StringIO

    from rich.console import Console

    from omnifuse.training.progress import StepProgress

    out = StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    shown = []
    with StepProgress("train", 3, console=console) as progress:
        shown.append(progress._bar.tasks[0].fields["loss"])
        for step, loss in ((1, 2.5), (2, float("nan"))):
            progress.update(step, loss)
            shown.append(progress._bar.tasks[0].fields["loss"])
    assert shown == ["-", "2.5000", "-"]  # a step without a usable row has no loss either
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without the terminal's control codes
    assert "nan" not in text and "0/3 loss -" in text


def test_fsdp_in_a_world_of_one_trains_as_unsharded(tmp_path):
    a = Trainer(TrainConfig(**{**TINY, "steps": 2, "out_dir": str(tmp_path / "a")}), quiet=True).run()
    b = Trainer(TrainConfig(**{**TINY, "steps": 2, "distributed": "fsdp", "out_dir": str(tmp_path / "b")}),
                quiet=True).run()
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]


def _torchrun(args: list[str], port: int, script: str | None = None, check: bool = True):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found")
    target = [script] if script else ["-m", "omnifuse"]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), *target, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_a_killed_run_resumes_exactly(tmp_path):
    """Sharded over two processes (gloo): the losses and the gathered weights of the one-process
    run with the same global batch; killed after step 5 and resumed from its step-4 checkpoint
    (each process's shards read back through torch.distributed.checkpoint), the losses and
    weights of the uninterrupted sharded run, exactly."""
    from safetensors.torch import load_file

    settings = {**TINY, "steps": 8, "checkpoint_every": 4, "eval_every": 0}
    _run_cli(["train", *_overrides({**settings, "batch_size": 8, "out_dir": tmp_path / "one"})])
    sharded = {**settings, "batch_size": 4, "distributed": "fsdp"}
    _torchrun(["train", *_overrides({**sharded, "out_dir": tmp_path / "whole"})], 29615)
    one, whole = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "whole" / "metrics.jsonl")
    assert len(one) == len(whole) == 8
    for a, b in zip(one, whole):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))
    final = "checkpoints/step-000008/model.safetensors"
    w1, w2 = load_file(str(tmp_path / "one" / final)), load_file(str(tmp_path / "whole" / final))
    for k in w1:  # the tolerance of the DDP test above, for the same reason
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3, msg=k)
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints" / "step-000008" / "dcp").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]

    script = tmp_path / "killed.py"
    script.write_text(_KILLED)
    killed = _torchrun(["5", "train", *_overrides({**sharded, "out_dir": tmp_path / "cut"})], 29616, str(script),
                       check=False)
    assert killed.returncode != 0
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step-000004"
    _torchrun(["train", *_overrides({**sharded, "out_dir": tmp_path / "cut"})], 29617)
    assert _losses(tmp_path / "cut" / "metrics.jsonl") == whole
    for k, v in load_file(str(tmp_path / "cut" / final)).items():
        assert torch.equal(v, w2[k]), k
    # an unsharded run cannot pick up the sharded optimizer state, and says so
    proc = _run_cli(["train", *_overrides({**settings, "batch_size": 8, "out_dir": tmp_path / "cut", "steps": 12})],
                    check=False)
    assert proc.returncode == 1 and "written by an FSDP run" in proc.stderr


def test_length_groups_keep_every_row_and_cut_padding():
    from omnifuse.training.collate import Example, length_groups

    def row(n):
        return Example(list(range(n)), [IGNORE] * n, [], {"n": n})

    rows = [row(n) for n in (130, 186, 124, 140, 188, 131, 129, 135, 126, 138, 133, 186, 127, 136, 132, 139)]
    groups = length_groups(rows)
    assert sorted(e.meta["n"] for g in groups for e in g) == sorted(e.meta["n"] for e in rows)
    padded = sum(len(g) * max(len(e.input_ids) for e in g) for g in groups)
    assert padded < 0.85 * 16 * 188 and len(groups) == 2  # the two-image rows get their own pass
    assert length_groups([row(10)] * 5) == [[row(10)] * 5]  # equal lengths: one pass
    assert length_groups([]) == []


def test_grouped_micro_batches_give_the_gradient_of_one_batch(tmp_path):
    # The loss is summed over answer tokens and divided by the step's count: splitting a step's
    # rows by length changes the padding, not the gradient.
    trainer = Trainer(TrainConfig(**{**TINY, "skills": ("colour", "compare"), "max_length": 256, "out_dir": str(tmp_path)}),
                      quiet=True)
    examples = trainer.reader.examples(trainer.train_source, list(range(16)))
    assert len({len(e.input_ids) for e in examples}) > 1

    def gradient(groups):
        trainer.model.zero_grad()
        tokens = sum(int((torch.tensor(e.labels[1:]) != IGNORE).sum()) for e in examples)
        for g in groups:
            b = collate(g, trainer.tokenizer.pad_token_id)
            logits = trainer.model(b["input_ids"], b["attention_mask"], images=b["images"])
            (next_token_loss(logits, b["labels"], reduction="sum") / tokens).backward()
        return [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    whole, split = gradient([examples]), gradient(length_groups(examples))
    assert len(length_groups(examples)) > 1
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_pooled_image_features_equal_one_image_at_a_time():
    from omnifuse.model import build_model
    from omnifuse.presets import get_preset
    from omnifuse.training.contrastive import pooled_image_features

    torch.manual_seed(0)
    encoder = build_model(get_preset("tiny-cross")).vision_encoder.eval()
    pixels = [torch.randn(n, 3, 32, 32) for n in (1, 2, 1, 4, 2)]  # images of 1, 2 and 4 crops
    with torch.no_grad():
        batched = pooled_image_features(encoder, pixels)
        single = torch.stack([encoder(p).mean(dim=(0, 1)) for p in pixels])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_a_frozen_encoder_encodes_each_image_once_for_every_trainer(tmp_path):
    cfg = TrainConfig(**{**TINY, "stage": "align", "out_dir": str(tmp_path)})  # the encoder is frozen
    plain = Trainer(cfg, quiet=True)
    plain_losses = [plain.train_step(s) for s in range(3)]
    shared: dict = {}
    first = Trainer(cfg, quiet=True, shared_features=shared)
    assert [first.train_step(s) for s in range(3)] == plain_losses  # same batches: same features
    assert len(shared) == 3 * TINY["batch_size"]  # one entry per training image seen
    second = Trainer(cfg, quiet=True, shared_features=shared)
    calls = []
    second.model.vision_encoder.register_forward_hook(lambda *args: calls.append(1))
    assert [second.train_step(s) for s in range(3)] == plain_losses and calls == []  # nothing encoded again
    unshared: dict = {}
    learning = Trainer(TrainConfig(**{**TINY, "train_encoder": True, "out_dir": str(tmp_path)}), quiet=True,
                       shared_features=unshared)
    learning.train_step(0)
    assert unshared == {}  # features of an encoder that learns go stale: none are kept


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_answer_only_logits_give_the_full_pass_loss_and_gradient(fusion):
    # The last layer computes just the positions the loss reads: same loss, same gradient.
    from conftest import make_model, tiny_config

    from omnifuse.training.losses import answer_positions, selected_token_loss

    model = make_model(tiny_config(fusion, cross_layers=(1, 3)), gates=0.5).train()
    b = _builder(cross=fusion == "cross")
    turns = [[("user", "<image>what colour?"), ("assistant", "red")],
             [("user", "how many?"), ("assistant", "three, i think"), ("user", "sure?"), ("assistant", "yes")]]
    images = [[_image_of(model)], []]
    batch = collate([b.build(t, i) for t, i in zip(turns, images)], 0)
    args = (batch["input_ids"], batch["attention_mask"])

    def run(selected: bool):
        model.zero_grad()
        if selected:
            positions, targets = answer_positions(batch["labels"])
            loss = selected_token_loss(model(*args, images=batch["images"], outputs=positions), targets)
        else:
            loss = next_token_loss(model(*args, images=batch["images"]), batch["labels"], reduction="sum")
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (full, g_full), (part, g_part) = run(False), run(True)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    assert len(g_full) == len(g_part)
    for a, c in zip(g_full, g_part):
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-4)


def _image_of(model):
    return model.image_processor(scene(40, 30, 1))


def test_answer_positions_pad_short_rows_with_ignored_targets():
    from omnifuse.training.losses import answer_positions

    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    positions, targets = answer_positions(labels)
    assert positions.tolist() == [[1, 2], [0, 0]] and targets.tolist() == [[5, 6], [7, IGNORE]]
