"""The ``omnifuse`` command line (omnifuse.cli): generate and info, and one-line errors.

Commands run in-process through ``main(argv)`` for speed; one test runs the installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnifuse.checkpoint import save_checkpoint
from omnifuse.cli import main
from omnifuse.modalities import build_image_processor
from omnifuse.pipeline import Pipeline
from omnifuse.presets import get_preset, preset_names

PROMPT = "Describe."  # 9 bytes with the byte tokenizer
WIDE = (80, 48)  # (width, height): a 2 x 2 tile canvas for tiny-cross, padded to a square for tiny-early


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv: str) -> dict:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # one JSON object, nothing else on stdout
    return json.loads(lines[0])


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc != 0
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("omnifuse: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    wide = folder / "wide.png"
    Image.fromarray(rng.integers(0, 256, (WIDE[1], WIDE[0], 3), dtype=np.uint8)).save(wide)
    square = folder / "square.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(square)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 10)
    return {"wide": wide, "square": square, "empty": empty, "corrupt": corrupt, "missing": folder / "absent.png"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the models ``--preset NAME`` builds (Pipeline.from_preset(NAME, seed=0))."""
    out = {}
    for name in ("tiny-early", "tiny-cross"):
        out[name] = save_checkpoint(Pipeline.from_preset(name, seed=0).model, tmp_path_factory.mktemp(name))
    return out


# --- generate --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_generate_json(capsys, images, name):
    out = run_json(capsys, "generate", "--preset", name, "--image", images["wide"], "--prompt", PROMPT,
                   "--max-new-tokens", "8")
    assert {"text", "tokens", "prompt_tokens", "visual_tokens"} <= set(out)
    visual = build_image_processor(get_preset(name)).num_tokens(*WIDE)
    assert out["visual_tokens"] == visual
    # "<s>" + "<image>" + "\n" + PROMPT; early fusion expands the placeholder to the visual tokens,
    # cross fusion keeps one placeholder in the context.
    text_tokens = 1 + 1 + len(PROMPT)
    if name == "tiny-early":
        assert out["prompt_tokens"] == text_tokens + visual
    else:
        assert out["prompt_tokens"] == text_tokens + 1
    assert len(out["tokens"]) == out["completion_tokens"] <= 8
    assert all(isinstance(t, int) and 0 <= t < 260 for t in out["tokens"])
    assert out["finish_reason"] in ("stop", "length")
    crops, tiles = (1, [1, 1]) if name == "tiny-early" else (4, [2, 2])
    assert out["images"] == [{"width": WIDE[0], "height": WIDE[1], "tokens": visual, "crops": crops, "tiles": tiles}]


def test_visual_tokens_differ_by_fusion_and_image_size(capsys, images):
    # tiny-early: one 64 px crop, 8 x 8 patches, CLS dropped -> 64 whatever the size.
    # tiny-cross: 32 px tiles of 4 x 4 patches + CLS -> 17 per tile; 80 x 48 takes a 2 x 2 canvas.
    early = run_json(capsys, "generate", "--preset", "tiny-early", "--image", images["wide"], "--prompt", PROMPT,
                     "--max-new-tokens", "1")
    cross = run_json(capsys, "generate", "--preset", "tiny-cross", "--image", images["wide"], "--prompt", PROMPT,
                     "--max-new-tokens", "1")
    assert early["visual_tokens"] == 64
    assert cross["visual_tokens"] == 4 * 17
    assert cross["images"][0]["tiles"] == [2, 2]


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_sampling_with_a_seed_is_reproducible(capsys, images, name):
    argv = ["generate", "--preset", name, "--image", images["square"], "--prompt", PROMPT,
            "--seed", "3", "--temperature", "0.8", "--max-new-tokens", "16"]
    first, second = run_json(capsys, *argv), run_json(capsys, *argv)
    assert first["tokens"] == second["tokens"]
    assert first["text"] == second["text"]


def test_different_seeds_sample_differently(capsys):
    runs = [tuple(run_json(capsys, "generate", "--preset", "tiny-early", "--prompt", PROMPT, "--seed", str(seed),
                           "--temperature", "0.8", "--max-new-tokens", "16")["tokens"])
            for seed in range(4)]
    assert len(set(runs)) > 1


def test_greedy_ignores_the_seed(capsys):
    runs = [run_json(capsys, "generate", "--preset", "tiny-cross", "--prompt", PROMPT, "--seed", str(seed),
                     "--max-new-tokens", "8")["tokens"] for seed in (0, 1)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_two_images(capsys, images, name):
    proc = build_image_processor(get_preset(name))
    expected = proc.num_tokens(*WIDE) + proc.num_tokens(64, 64)
    for prompt in (PROMPT, "<image> then <image>: " + PROMPT):  # placeholders added in front, or placed
        out = run_json(capsys, "generate", "--preset", name, "--image", images["wide"], "--image", images["square"],
                       "--prompt", prompt, "--max-new-tokens", "4")
        assert out["visual_tokens"] == expected
        assert [(img["width"], img["height"]) for img in out["images"]] == [WIDE, (64, 64)]


def test_generate_without_json_prints_text_and_a_summary(capsys):
    rc, out, err = run(capsys, "generate", "--preset", "tiny-early", "--prompt", PROMPT, "--max-new-tokens", "4")
    assert rc == 0
    expected = run_json(capsys, "generate", "--preset", "tiny-early", "--prompt", PROMPT, "--max-new-tokens", "4")
    assert out == expected["text"] + "\n"
    assert "prompt tokens" in err and "KV cache" in err


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_summary_says_where_the_visual_tokens_are(capsys, images, name):
    rc, _, err = run(capsys, "generate", "--preset", name, "--image", images["square"], "--prompt", "hi",
                     "--max-new-tokens", "2")
    out = run_json(capsys, "generate", "--preset", name, "--image", images["square"], "--prompt", "hi",
                   "--max-new-tokens", "2")
    assert rc == 0
    p, v = out["prompt_tokens"], out["visual_tokens"]
    if name == "tiny-cross":  # the states sit beside the sequence: not a part of the prompt tokens
        assert v > p and f"{p} prompt tokens + {v} cross-attention states" in err
    else:
        assert v < p and f"{p} prompt tokens ({v} of them visual)" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_invalid_temperature_is_one_error_line(capsys, value):
    rc, _, err = run(capsys, "generate", "--preset", "tiny-early", "--prompt", "hi", f"--temperature={value}")
    assert rc == 1 and err.startswith("omnifuse: error:") and err.count("\n") == 1 and "temperature" in err


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_generate_from_checkpoint_equals_preset(capsys, checkpoints, name):
    argv = ["--prompt", PROMPT, "--max-new-tokens", "12", "--seed", "5", "--temperature", "0.9"]
    from_preset = run_json(capsys, "generate", "--preset", name, *argv)
    from_checkpoint = run_json(capsys, "generate", "--checkpoint", checkpoints[name], *argv)
    assert from_checkpoint["tokens"] == from_preset["tokens"]
    assert from_checkpoint["prompt_tokens"] == from_preset["prompt_tokens"]


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_generate_from_checkpoint_with_an_image_equals_preset(capsys, checkpoints, images, name):
    argv = ["--image", images["wide"], "--prompt", PROMPT, "--max-new-tokens", "12"]
    from_preset = run_json(capsys, "generate", "--preset", name, *argv)
    from_checkpoint = run_json(capsys, "generate", "--checkpoint", checkpoints[name], *argv)
    assert from_checkpoint["tokens"] == from_preset["tokens"]
    assert from_checkpoint["visual_tokens"] == from_preset["visual_tokens"]


# --- info ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross", "llava-1.5-7b", "llama-3.2-11b-vision"])
def test_info_json(capsys, name):
    info = run_json(capsys, "info", "--preset", name)
    cfg = get_preset(name)
    assert info["name"] == name
    params = info["parameters"]
    assert params["total"] > 0
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    d = cfg.decoder
    assert info["kv_cache_bytes_per_token"] == 2 * d.num_layers * d.num_kv_heads * d.head_dim * 4
    assert info["context_length"] == d.max_position
    size = cfg.image.image_size
    assert info["visual_tokens_per_image"] == build_image_processor(cfg).num_tokens(size, size)
    cross_keys = {"cross_attention_layers", "cross_attention_kv_bytes_per_state", "cross_attention_states_prefill",
                  "cross_attention_states_decode", "cross_attention_kv_bytes_prefill", "cross_attention_kv_bytes_decode"}
    if cfg.fusion.type == "cross":
        assert set(info) >= cross_keys
        assert info["cross_attention_kv_bytes_decode"] > 0
        assert info["cross_attention_layers"] == list(cfg.cross_layers)
        assert info["visual_tokens_per_image"] == info["cross_attention_states_prefill"]
        for when in ("prefill", "decode"):
            assert info[f"cross_attention_kv_bytes_{when}"] == (info[f"cross_attention_states_{when}"]
                                                                * info["cross_attention_kv_bytes_per_state"])
    else:
        assert not cross_keys & set(info)


def test_info_llava_1_5_7b_matches_the_published_model(capsys):
    info = run_json(capsys, "info", "--preset", "llava-1.5-7b")
    assert info["visual_tokens_per_image"] == 576  # (336 / 14)^2, CLS dropped
    assert info["context_tokens_per_image"] == 576
    assert info["kv_cache_bytes_per_token"] == 2 * 32 * 32 * 128 * 4  # fp32, 32 layers x 32 heads x 128
    assert info["kv_cache_bytes_per_image"] == 576 * 2 * 32 * 32 * 128 * 4
    # Vicuna-7B = Llama 2 7B (6,738,415,616) with the vocabulary padded from 32000 to 32064.
    assert info["parameters"]["decoder"] == 6_738_415_616 + 2 * 64 * 4096
    assert 7.0e9 < info["parameters"]["total"] < 7.1e9


def test_info_llama_3_2_11b_vision_matches_the_published_model(capsys):
    info = run_json(capsys, "info", "--preset", "llama-3.2-11b-vision")
    # Every image is padded to 4 tiles of 40 x 40 patches + CLS, and all 4 are encoded and cached at
    # prefill; decode attends to the real tile only (a 560 x 560 image fills one).
    assert info["visual_tokens_per_image"] == 4 * 1601
    assert info["cross_attention_states_prefill"] == 4 * 1601
    assert info["cross_attention_states_decode"] == 1601
    assert info["crops"] == 4 and info["tile_canvas"] == {"rows": 1, "cols": 1}
    assert info["context_tokens_per_image"] == 1  # one <|image|> placeholder in the context
    assert info["kv_cache_bytes_per_token"] == 2 * 32 * 8 * 128 * 4  # GQA: 8 KV heads
    assert info["cross_attention_layers"] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert info["cross_attention_kv_bytes_prefill"] == 4 * 1601 * 2 * 8 * 8 * 128 * 4
    assert info["cross_attention_kv_bytes_decode"] == 1601 * 2 * 8 * 8 * 128 * 4
    assert info["parameters"]["decoder"] == 8_030_261_248 + 8 * 4096  # Llama 3.1 8B + 8 image-token rows
    assert info["parameters"]["total"] == 10_670_220_835  # transformers counts the same for the published config


def test_info_image_size(capsys):
    info = run_json(capsys, "info", "--preset", "llama-3.2-11b-vision", "--image", "1200x300")
    assert info["image_size"] == [1200, 300] and info["tile_canvas"] == {"rows": 1, "cols": 3}
    assert (info["cross_attention_states_prefill"], info["cross_attention_states_decode"]) == (4 * 1601, 3 * 1601)
    rc, _, err = run(capsys, "info", "--preset", "tiny-early", "--image", "big")
    assert rc == 1 and "--image expects WIDTHxHEIGHT" in err


def test_info_list(capsys):
    rc, out, _ = run(capsys, "info", "--list")
    assert rc == 0
    assert out.split() == preset_names()


def test_info_table(capsys):
    rc, out, _ = run(capsys, "info", "--preset", "tiny-early")
    assert rc == 0
    assert "parameters.total" in out and "visual_tokens_per_image" in out and "tiny-early" in out


def test_info_checkpoint(capsys, checkpoints):
    for name, folder in checkpoints.items():
        assert run_json(capsys, "info", "--checkpoint", folder) == run_json(capsys, "info", "--preset", name)


def test_info_checkpoint_reads_no_weights(capsys, checkpoints, tmp_path):
    (tmp_path / "config.json").write_text((checkpoints["tiny-cross"] / "config.json").read_text())
    assert run_json(capsys, "info", "--checkpoint", tmp_path)["name"] == "tiny-cross"


# --- errors: one line on stderr, non-zero exit, no traceback ----------------------------------


def test_missing_image_file(capsys, images):
    rc, out, err = run(capsys, "generate", "--preset", "tiny-early", "--image", images["missing"], "--prompt", PROMPT)
    assert_one_line_error(rc, err, "not found", "absent.png")
    assert out == ""


def test_empty_image_file(capsys, images):
    rc, _, err = run(capsys, "generate", "--preset", "tiny-cross", "--image", images["empty"], "--prompt", PROMPT)
    assert_one_line_error(rc, err, "empty", "empty.png")


def test_corrupt_image_file(capsys, images):
    rc, _, err = run(capsys, "generate", "--preset", "tiny-early", "--image", images["corrupt"], "--prompt", PROMPT)
    assert_one_line_error(rc, err, "cannot decode", "corrupt.png")


@pytest.mark.parametrize("command", ["generate", "info"])
def test_unknown_preset(capsys, command):
    extra = ["--prompt", PROMPT] if command == "generate" else []
    rc, _, err = run(capsys, command, "--preset", "tiny-late", *extra)
    assert_one_line_error(rc, err, "unknown preset", "tiny-late", "tiny-early")


def test_prompt_longer_than_the_context(capsys):
    rc, _, err = run(capsys, "generate", "--preset", "tiny-early", "--prompt", "x" * 3000)
    assert_one_line_error(rc, err, "3001", "2048", "context")


def test_image_tokens_push_the_prompt_past_the_context(capsys, images):
    # 2000 text tokens fit the 2048-token context; 64 early-fusion image tokens do not.
    rc, _, err = run(capsys, "generate", "--preset", "tiny-early", "--image", images["square"],
                     "--prompt", "x" * 2000, "--max-new-tokens", "1")
    assert_one_line_error(rc, err, "2048", "context")


@pytest.mark.parametrize("command", ["generate", "info"])
def test_missing_checkpoint_folder(capsys, tmp_path, command):
    extra = ["--prompt", PROMPT] if command == "generate" else []
    rc, _, err = run(capsys, command, "--checkpoint", tmp_path / "no-such-ckpt", *extra)
    assert_one_line_error(rc, err, "checkpoint folder not found", "no-such-ckpt")


@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross"])
def test_image_count_differs_from_placeholders(capsys, images, name):
    rc, _, err = run(capsys, "generate", "--preset", name, "--image", images["square"],
                     "--prompt", "<image> and <image>: " + PROMPT)
    assert_one_line_error(rc, err, "2 image placeholders (<image>)", "1 image was given")


def test_info_needs_a_model(capsys):
    rc, _, err = run(capsys, "info")
    assert_one_line_error(rc, err, "--preset", "--checkpoint", "--list")


def test_console_script_error_is_one_line(images):
    exe = shutil.which("omnifuse", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "omnifuse"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*cmd, "generate", "--preset", "tiny-early", "--image", str(images["missing"]),
                           "--prompt", PROMPT], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "image file not found", "absent.png")


# --- device and dtype, chosen once at the entry point ---------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_error_line(capsys):
    assert main(["generate", "--preset", "tiny-early", "--prompt", "hi", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device cuda was asked for but torch sees no CUDA GPU" in err[0]


def test_float16_on_the_cpu_is_refused_and_bfloat16_runs(capsys):
    assert main(["generate", "--preset", "tiny-early", "--prompt", "hi", "--device", "cpu", "--dtype", "float16"]) == 1
    assert "float16 is not supported on the CPU" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny-cross", "--prompt", "hi", "--dtype", "bfloat16", "--json",
                 "--max-new-tokens", "4"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 4


def test_packing_and_quantizing_are_explicit_steps():
    from omnifuse.inference.quantize import Int8Linear
    from omnifuse.nn.packed import PackedLinear
    from omnifuse.pipeline import Pipeline

    pipe = Pipeline.from_preset("tiny-early")
    assert not any(isinstance(m, (PackedLinear, Int8Linear)) for m in pipe.model.modules())
    packed = pipe.pack().model
    assert any(isinstance(m, PackedLinear) for m in packed.modules()) or not _can_pack()
    quantized = Pipeline.from_preset("tiny-early").quantize("int8").model
    assert any(isinstance(m, Int8Linear) for m in quantized.modules())


def _can_pack() -> bool:
    from omnifuse.nn.packed import can_pack

    return can_pack()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_cuda_gives_the_cpu_tokens(capsys):
    args = ["generate", "--preset", "tiny-early", "--prompt", "hello", "--json", "--dtype", "float32"]
    assert main([*args, "--device", "cpu"]) == 0
    on_cpu = json.loads(capsys.readouterr().out)["tokens"]
    assert main([*args, "--device", "cuda"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == on_cpu
