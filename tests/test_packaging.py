"""`omnifuse demo` and `omnifuse arena` run from an installed wheel, not only from a checkout: the
default arena config and the model files it names are package data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import omnifuse
from omnifuse.arena.run import DEFAULT_CONFIG, load_arena_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(omnifuse.__file__).resolve().parent


def test_default_arena_config_and_its_models_are_inside_the_package():
    assert DEFAULT_CONFIG.is_file() and PACKAGE in DEFAULT_CONFIG.parents
    for strategy in load_arena_config().strategies:
        model = Path(strategy.model).resolve()
        assert model.is_file() and PACKAGE in model.parents, strategy


def test_demo_runs_the_packaged_default(monkeypatch, tmp_path):
    import omnifuse.arena
    from omnifuse.cli import main

    seen = []
    monkeypatch.setattr(omnifuse.arena, "run_arena", lambda config, quick, **options: seen.append((config, quick)))
    assert main(["demo", "--quick", "--out-dir", str(tmp_path)]) == 0
    ((config, quick),) = seen
    assert quick and config.out_dir == str(tmp_path)
    assert config.strategies == load_arena_config(DEFAULT_CONFIG).strategies


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the sources, so the build writes nothing into the checkout."""
    src = tmp_path / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src" / "omnifuse", src / "src" / "omnifuse",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), str(src)], tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("omnifuse-*.whl")
    return wheel


def _run(command: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # One thread: on a busy 2-core machine two OpenMP threads that wait by spinning ran 5x slower;
    # nothing here measures speed.
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_installed_wheel_runs_arena_quick_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"omnifuse/configs/arena.yaml", "omnifuse/configs/models/arena-early.yaml",
            "omnifuse/configs/models/arena-cross.yaml"} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, timeout=300)
    python = venv / "bin" / "python"
    # Installed while the venv sees nothing else, so pip neither skips it as "already installed" (the
    # checkout's editable install) nor touches anything outside the venv.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, timeout=300)
    # The dependencies (torch, ...) from this interpreter's site-packages, without reinstalling them: a
    # plain path line adds the folder but runs none of its .pth files, so the checkout's editable
    # install (a .pth naming src/, or a finder it installs) stays out.
    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work)
                .stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "omnifuse_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))

    probe = ("import json, omnifuse, omnifuse.arena, omnifuse.cli\n"
             "from omnifuse.arena.run import DEFAULT_CONFIG\n"
             "seen = []\n"
             "omnifuse.arena.run_arena = lambda config, quick, **options: seen.append(config)\n"
             "assert omnifuse.cli.main(['demo', '--quick']) == 0\n"
             "print(json.dumps([omnifuse.__file__, str(DEFAULT_CONFIG), *[s.model for s in seen[0].strategies]]))\n")
    package, *configs = json.loads(_run([str(python), "-c", probe], work).stdout.splitlines()[-1])
    assert Path(package).is_relative_to(venv) and not Path(package).is_relative_to(ROOT)
    assert len(configs) == 3 and all(Path(c).is_file() and Path(c).is_relative_to(site) for c in configs), configs

    out = tmp_path / "arena"
    proc = _run([str(venv / "bin" / "omnifuse"), "arena", "--quick", "--out-dir", str(out)], work, timeout=900)
    assert (out / "report.md").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["strategies"]] == ["early", "cross"]
    assert f"report: {out}/report.md" in proc.stdout
