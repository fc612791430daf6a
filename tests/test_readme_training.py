"""Every training command README shows runs as written, from the repository root and from another
folder (paths inside a config are relative to the config file; tiny overrides keep each run short)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scene

from omnifuse.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Appended to each command (later key=value settings win): a couple of steps on a tiny data set.
TINY = ["steps=2", "train_size=64", "val_size=4", "batch_size=2", "warmup_steps=0", "eval_every=0",
        "checkpoint_every=0", "max_new_tokens=2"]


def _readme_training_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Training\n+```bash\n(.*?)```", text, re.S)
    assert block, "README has no training command block"
    joined = block.group(1).replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [c for c in commands if c]


def _data(folder: Path) -> None:
    """The files README's LLaVA commands name: pairs.jsonl, llava.json and images/."""
    (folder / "images").mkdir()
    for i in range(4):
        scene(48, 40, i).save(folder / "images" / f"{i}.png")
    pairs = [{"image": f"{i}.png", "caption": f"scene {i}"} for i in range(4)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    convs = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                                    {"from": "gpt", "value": f"scene {i}"}]} for i in range(4)]
    (folder / "llava.json").write_text(json.dumps(convs))


def _as_run_from(command: list[str], where: str) -> list[str]:
    """README's command as a user runs it from ``where``: "root" as written, "elsewhere" with the
    config path pointing into the repository."""
    if where == "root":
        return command
    return [str(ROOT / a) if a.startswith("configs/") else a for a in command]


def test_readme_lists_the_training_commands():
    commands = _readme_training_commands()
    configs = {c[c.index("--config") + 1] for c in commands if "--config" in c}
    shipped = {f"configs/{p.name}" for p in (ROOT / "configs").glob("train-*.yaml")}
    assert configs == shipped  # every shipped training config has a command, and every command a config
    assert any(c[0] == "torchrun" for c in commands)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_readme_training_commands_run(tmp_path, monkeypatch, where):
    cwd = ROOT if where == "root" else tmp_path
    data = tmp_path / "data"
    data.mkdir()
    _data(data)
    monkeypatch.chdir(cwd)
    outputs = {}
    for command in _readme_training_commands():
        if command[0] != "omnifuse":
            continue
        args = _as_run_from(command, where)[1:]
        config = Path(args[args.index("--config") + 1]).stem
        out_dir = tmp_path / "runs" / f"{config}-{len(outputs)}"
        extra = [f"out_dir={out_dir}"]
        if "data_path=pairs.jsonl" in args or "data_path=llava.json" in args:
            # The data README names, from where the user stands.
            args = [a.replace("=pairs.jsonl", f"={data}/pairs.jsonl").replace("=llava.json", f"={data}/llava.json")
                    .replace("image_folder=images/", f"image_folder={data}/images/") for a in args]
        if any(a.startswith("init_checkpoint=") for a in args):
            extra.append(f"init_checkpoint={outputs['train-llava-align']}/checkpoints/step-000002")
        if config == "train-contrastive":
            extra.append("batch_size=4")  # contrastive pairs need more than one negative
        code = main([*args, *TINY, *extra])
        assert code == 0, command
        assert (out_dir / "checkpoints" / "step-000002" / "model.safetensors").is_file(), command
        outputs.setdefault(config, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_readme_torchrun_command_runs(tmp_path, where):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not found")
    (command,) = [c for c in _readme_training_commands() if c[0] == "torchrun"]
    command = [torchrun, *_as_run_from(command, where)[1:]]
    command[1:1] = ["--master_port", "29614" if where == "root" else "29615"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, *TINY, "batch_size=2", f"out_dir={tmp_path / 'run'}"], capture_output=True,
                          text=True, cwd=ROOT if where == "root" else tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors").is_file()
