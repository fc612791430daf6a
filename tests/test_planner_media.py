"""The planner counts audio and video of omnifuse models with the processors' own token counts,
and ``plan --measure`` agrees exactly with the built model on tokens, KV bytes and FLOPs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf

from omnifuse.cli import main
from omnifuse.config import VideoConfig, save_config
from omnifuse.planner.measure import measure_request
from omnifuse.planner.plan import Workload, plan, resolve_model
from omnifuse.presets import get_preset


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("preset, audio, video, fps", [("tiny-omni-early", 2.5, 3.0, 1.0),
                                                        ("tiny-omni-cross", 11.0, 2.5, 2.0)])
def test_plan_measure_agrees_on_audio_and_video(capsys, preset, audio, video, fps):
    rc, out, err = run(capsys, "plan", "--preset", preset, "--measure", "--text-tokens", "16", "--image", "64x64",
                       "--audio-seconds", audio, "--video-seconds", video, "--fps", fps, "--video-size", "48x32",
                       "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["agree"], result["rows"]
    assert [i["kind"] for i in result["predicted"]["inputs"]] == ["image", "audio", "video"]
    assert result["predicted"]["prefill_flops"] == result["measured"]["prefill_flops"]


def test_temporal_patches_are_priced_as_run():
    config = dataclasses.replace(get_preset("tiny-omni-early"), video=VideoConfig(fps=2.0, max_frames=16, temporal_patch=2))
    model = dataclasses.replace(resolve_model("tiny-omni-early"), config=config)  # its video: pairs of frames
    workload = Workload(text_tokens=8, output_tokens=1, video_seconds=2.5, fps=2.0, video_size=(64, 64))
    predicted = plan(model, workload, dtype="fp32", kv_dtype="fp32")
    measured = measure_request(config, [], 8, 1, repeats=1, video_seconds=2.5, video_size=(64, 64), fps=2.0)
    assert predicted["inputs"][0]["tokens"] == measured["visual_tokens"][0] == 3 * 64  # 5 frames -> 3 pairs
    assert predicted["prefill_flops"] == measured["prefill_flops"]


def test_a_model_file_counts_audio_as_generate_does(capsys, tmp_path):
    config = get_preset("tiny-omni-early")
    path = tmp_path / "omni.yaml"
    save_config(config, path)
    rc, out, err = run(capsys, "plan", "--model", path, "--audio-seconds", "1.5", "--text-tokens", "4", "--json")
    assert rc == 0, err
    planned = json.loads(out)["inputs"][0]
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(24000, np.float32) + 0.1, 16000)
    rc, out, err = run(capsys, "generate", "--preset", "tiny-omni-early", "--audio", wav, "--prompt", "hi",
                       "--max-new-tokens", "1", "--json")
    assert rc == 0, err
    assert planned["tokens"] == json.loads(out)["audio"][0]["tokens"] == 37


def test_a_model_without_the_modality_is_named(capsys):
    rc, _, err = run(capsys, "plan", "--preset", "tiny-early", "--audio-seconds", "2")
    assert rc != 0 and "tiny-early has no audio encoder" in err
    rc, _, err = run(capsys, "plan", "--preset", "tiny-cross", "--video-seconds", "2")
    assert rc != 0 and "tiny-cross takes no video" in err
