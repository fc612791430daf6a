"""Video through the model and the CLI: frames through the vision encoder with a temporal
embedding, token counts, temporal patches, all three modalities in one batch, checkpoints."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene
from test_audio_model import AUDIO, audio_config, clip
from test_video import make_video

from omnifuse.checkpoint import load_checkpoint, save_checkpoint
from omnifuse.cli import main
from omnifuse.config import TextConfig, VideoConfig
from omnifuse.errors import FeatureCountError, VideoError
from omnifuse.inference import SamplingConfig, generate

VIDEO = 261  # the byte tokenizer's <video>


def omni_config(fusion="early", temporal_patch=1, max_frames=8):
    base = audio_config(fusion)
    return dataclasses.replace(
        base, video=VideoConfig(fps=2.0, max_frames=max_frames, temporal_patch=temporal_patch),
        decoder=dataclasses.replace(base.decoder, vocab_size=262),
        text=TextConfig(placeholder_tokens={"image": "<image>", "audio": "<audio>", "video": "<video>"}))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    out = {}
    for name, n, codec, suffix in (("short", 15, "mpeg4", ".mp4"), ("odd", 25, "libvpx", ".webm")):
        path = folder / f"{name}{suffix}"
        make_video(path, [Fraction(i, 10) for i in range(n)], codec=codec, time_base=Fraction(1, 10), rate=Fraction(10))
        out[name] = path
    return out


@pytest.mark.parametrize("temporal_patch", [1, 2])
def test_video_tokens_are_what_the_encoder_gives(videos, temporal_patch):
    model = make_model(omni_config(temporal_patch=temporal_patch))
    proc = model.processors["video"]
    for name, seconds in (("short", 1.5), ("odd", 2.5)):
        item = proc(videos[name])
        frames = len(item.timestamps)
        assert frames == proc.num_frames(seconds) == {1.5: 3, 2.5: 5}[seconds]
        per_frame = model.image_processor.num_tokens(48, 32)
        assert item.num_tokens == -(-frames // temporal_patch) * per_frame == proc.num_tokens(seconds, 48, 32)
        (tokens,) = model.encode_media([item])
        assert tokens.shape == (item.num_tokens, 64)


def test_frames_are_images_with_time(videos):
    model = make_model(omni_config())
    assert [k for k in model.state_dict() if k.startswith("encoders.video.")] == ["encoders.video.temporal_embedding"]
    item = model.processors["video"](videos["short"])
    image = model.image_processor(scene(48, 32))
    still = dataclasses.replace(item, inputs={"pixel_values": image.pixel_values[None].expand(3, 1, -1, -1, -1),
                                              "group_ids": torch.arange(3)})
    with torch.no_grad():
        (tokens,) = model.encode_media([still])
        (alone,) = model.encode_media([image])
        model.encoders["video"].temporal_embedding.zero_()
        (timeless,) = model.encode_media([still])
    n = image.num_tokens
    assert not torch.allclose(tokens[:n], tokens[n:2 * n], atol=1e-4)  # the same picture at two times
    torch.testing.assert_close(timeless[:n], alone)  # without time, a frame is exactly the image
    torch.testing.assert_close(timeless[n:2 * n], alone)


def _prompt(model, items, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3,), generator=g).tolist()
    marks = {"image": PLACEHOLDER, "audio": AUDIO, "video": VIDEO}
    for item in items:
        ids += [marks[item.modality]] * model.fusion.placeholder_tokens(item.num_tokens)
        ids += torch.randint(0, 256, (2,), generator=g).tolist()
    return ids


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_rows_with_no_media_audio_video_or_all_three_batch_as_alone(videos, fusion):
    model = make_model(omni_config(fusion), gates=0.5)
    audio, video = model.processors["audio"], model.processors["video"]
    rows = [[], [audio(clip(0.7, 450))], [video(videos["short"])],
            [video(videos["odd"]), audio(clip(0.4, 800, seed=3)), model.image_processor(scene(40, 30))]]
    prompts = [_prompt(model, items, i) for i, items in enumerate(rows)]
    cfg = SamplingConfig(max_new_tokens=10, stop_token_ids=())
    with torch.no_grad():
        batched = generate(model, prompts, rows, cfg)
        alone = [generate(model, [p], [r], cfg)[0] for p, r in zip(prompts, rows)]
    assert batched == alone


def test_a_saved_video_model_loads_with_the_same_tokens(tmp_path, videos):
    model = make_model(omni_config(temporal_patch=2))
    folder = save_checkpoint(model, tmp_path / "omni")
    loaded = load_checkpoint(folder)
    item = model.processors["video"](videos["odd"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_media([item])[0], model.encode_media([item])[0])


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("preset", ["tiny-omni-early", "tiny-omni-cross"])
def test_generate_reports_each_video(capsys, videos, preset):
    rc, out, err = run(capsys, "generate", "--preset", preset, "--video", videos["odd"], "--video", videos["short"],
                       "--fps", "2", "--prompt", "<video> or <video>?", "--json", "--max-new-tokens", "3")
    assert rc == 0, err
    first, second = json.loads(out)["videos"]
    assert (first["frames"], first["timestamps"], first["seconds"]) == (5, [0.0, 0.5, 1.0, 1.5, 2.0], 2.5)
    assert second["frames"] == 3 and first["tokens"] == 5 * second["tokens"] / 3


def test_bad_video_requests_are_named(capsys, videos):
    rc, _, err = run(capsys, "generate", "--preset", "tiny-omni-early", "--video", videos["odd"], "--fps", "8",
                     "--prompt", "hi")
    assert rc == 1 and "gives 20 frames at 8 fps, more than max_frames 16" in err
    rc, _, err = run(capsys, "generate", "--preset", "tiny-omni-early", "--video", videos["short"],
                     "--prompt", "<video><video> twice")
    assert rc == 1 and "the prompt has 2 video placeholders (<video>) but 1 video was given" in err
    rc, _, err = run(capsys, "generate", "--preset", "tiny-early", "--video", videos["short"], "--prompt", "hi")
    assert rc == 1 and "tiny-early takes image input, not video (1 video given)" in err
    with pytest.raises(VideoError, match="image.mode fixed"):
        from omnifuse.modalities import build_image_processor
        from omnifuse.presets import get_preset
        from omnifuse.processing.video import VideoProcessor

        VideoProcessor(VideoConfig(), build_image_processor(get_preset("tiny-cross")))
    with pytest.raises(FeatureCountError, match="1 video placeholder"):
        from omnifuse.pipeline import Pipeline

        Pipeline.from_preset("tiny-omni-early").generate("<video>")


def test_info_reports_video_rates(capsys):
    rc, out, err = run(capsys, "info", "--preset", "tiny-omni-early", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert (info["video_fps"], info["video_tokens_per_frame"], info["video_tokens_per_second"]) == (1.0, 64, 64)
    assert info["parameters"]["video_encoder"] == 16 * 64  # its temporal embedding
    assert np.isclose(sum(v for k, v in info["parameters"].items() if k != "total"), info["parameters"]["total"])


def test_pooled_frames_take_their_positions_pooled_from_a_positional_connector(videos):
    from omnifuse.config import ConnectorConfig

    base = omni_config("cross")
    config = dataclasses.replace(base, connector=ConnectorConfig(type="mlp", position_embedding=True),
                                 video=dataclasses.replace(base.video, spatial_pool=2, temporal_embedding=False))
    model = make_model(config)
    connector = model.connectors[model.connector_of["video"]]
    item = model.processors["video"](videos["short"])
    with torch.no_grad():
        (plain,) = model.encode_media([item])  # positions start at zero
        connector.position_embedding.normal_()
        (placed,) = model.encode_media([item])
    pe = connector.position_embedding.detach()
    side = int(pe.shape[0] ** 0.5)
    # each pooled token's position: the mean of the 2 x 2 patches' positions it averages
    pooled = pe.view(side // 2, 2, side // 2, 2, -1).mean(dim=(1, 3)).reshape(-1, pe.shape[1])
    frames = len(item.timestamps)
    assert placed.shape[0] == frames * pooled.shape[0] == item.num_tokens
    torch.testing.assert_close(placed - plain, pooled.repeat(frames, 1))
