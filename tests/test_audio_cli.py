"""Audio through the pipeline and ``omnifuse generate``, from files made as a user would make
them (a WAV from a tone generator, an MP3), on the tiny image + audio presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from omnifuse.cli import main
from omnifuse.errors import FeatureCountError
from omnifuse.pipeline import Pipeline


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    t = np.arange(round(1.5 * 44100)) / 44100
    wav = folder / "tone.wav"
    sf.write(wav, np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1) * 0.4, 44100)
    import av

    mp3 = folder / "tone.mp3"
    with av.open(str(mp3), "w") as out:
        stream = out.add_stream("mp3", rate=22050, layout="mono")
        samples = (0.4 * np.sin(2 * np.pi * 330 * np.arange(2 * 22050) / 22050)).astype(np.float32)
        fmt = stream.codec_context.format.name
        for start in range(0, len(samples), 1152):
            frame = av.AudioFrame.from_ndarray(np.pad(samples[start:start + 1152], (0, max(0, start + 1152 - len(samples))))[None],
                                               format="fltp", layout="mono")
            frame.sample_rate = 22050
            for f in av.AudioResampler(format=fmt, layout="mono", rate=22050).resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    image = folder / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    return {"wav": wav, "mp3": mp3, "image": image}


@pytest.mark.parametrize("preset", ["tiny-omni-early", "tiny-omni-cross"])
def test_generate_json_reports_each_clip(capsys, media, preset):
    rc, out, err = run(capsys, "generate", "--preset", preset, "--audio", media["wav"], "--audio", media["mp3"],
                       "--image", media["image"], "--prompt", "<audio> then <image> then <audio>: what?", "--json")
    assert rc == 0, err
    result = json.loads(out)
    # 1.5 s -> 150 frames -> 75 after the stride-2 convolution -> 37 pooled; the MP3's length is
    # what the decoder hands back (2 s plus encoder padding), its tokens what that length gives.
    first, second = result["audio"]
    assert first == {"seconds": 1.5, "samples": 24000, "chunks": 1, "tokens": 37}
    pipe = Pipeline.from_preset(preset)
    assert second["tokens"] == pipe.model.processors["audio"].num_tokens_for_samples(second["samples"])
    assert abs(second["seconds"] - 2.0) < 0.1
    image_tokens = result["images"][0]["tokens"]
    if preset.endswith("early"):
        assert result["prompt_tokens"] == len(pipe.prompt_and_media("<audio> then <image> then <audio>: what?", {
            "image": pipe.process("image", [media["image"]]), "audio": pipe.process("audio", [media["wav"], media["mp3"]])})[0])
        assert result["cross_attention_states_prefill"] == 0
    else:
        assert result["cross_attention_states_prefill"] == 37 + second["tokens"] + image_tokens


def test_the_items_reach_the_model_in_prompt_order(media):
    pipe = Pipeline.from_preset("tiny-omni-early")
    audio = pipe.process("audio", [media["wav"], media["mp3"]])
    image = pipe.process("image", [media["image"]])
    ids, items = pipe.prompt_and_media("<audio> a <image> b <audio>", {"image": image, "audio": audio})
    assert [i.modality for i in items] == ["audio", "image", "audio"]
    assert items[0] is audio[0] and items[2] is audio[1]
    spans = [ids.count(260), ids.count(259)]
    assert spans == [audio[0].num_tokens + audio[1].num_tokens, image[0].num_tokens]
    first = ids.index(260)
    assert ids[first:first + audio[0].num_tokens] == [260] * audio[0].num_tokens and ids[first + audio[0].num_tokens] != 260
    # Without placeholders, images then audio go in front of the text.
    ids, items = pipe.prompt_and_media("what?", {"image": image, "audio": audio[:1]})
    assert [i.modality for i in items] == ["image", "audio"]
    with torch.no_grad():
        result = pipe.generate("what?", [media["image"]], pipe.sampling(max_new_tokens=3), audio=[media["wav"]])
    assert result.prompt_tokens == len(ids)


def test_placeholders_and_clips_that_disagree_are_named(capsys, media):
    rc, _, err = run(capsys, "generate", "--preset", "tiny-omni-early", "--audio", media["wav"],
                     "--prompt", "<audio><audio> twice?")
    assert rc == 1 and "the prompt has 2 audio placeholders (<audio>) but 1 audio clip was given" in err
    rc, _, err = run(capsys, "generate", "--preset", "tiny-early", "--audio", media["wav"], "--prompt", "hi")
    assert rc == 1 and "tiny-early takes image input, not audio (1 audio clip given)" in err
    with pytest.raises(FeatureCountError, match="1 audio placeholder"):
        Pipeline.from_preset("tiny-omni-cross").generate("<audio>", audio=[])


def test_bad_audio_files_are_one_line_errors(capsys, media, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + b"\0" * 40)
    for path, words in ((bad, "cannot decode"), (tmp_path / "none.wav", "not found")):
        rc, _, err = run(capsys, "generate", "--preset", "tiny-omni-early", "--audio", path, "--prompt", "hi")
        assert rc == 1 and err.startswith("omnifuse: error: ") and words in err and err.count("\n") == 1, err


def test_info_reports_audio_rates(capsys):
    rc, out, err = run(capsys, "info", "--preset", "tiny-omni-early", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert (info["audio_tokens_per_second"], info["audio_tokens_per_chunk"]) == (25, 250)
    assert info["parameters"]["audio_encoder"] > 0
    assert sum(v for k, v in info["parameters"].items() if k != "total") == info["parameters"]["total"]
