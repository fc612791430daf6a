"""Training on LLaVA-format records with audio and video beside images: the fields parse under the
same bad-record policy, the media reach the model in prompt order, truncation never cuts an audio
or video span, and a tiny image + audio + video model trains on them."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_video import make_video

from omnifuse.errors import FeatureCountError
from omnifuse.training.config import TrainConfig
from omnifuse.training.llava_data import read_llava_json
from omnifuse.training.loop import Trainer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    t = np.arange(16000) / 16000
    sf.write(root / "beep.wav", 0.4 * np.sin(2 * np.pi * 880 * t), 16000)
    sf.write(root / "hum.wav", 0.4 * np.sin(2 * np.pi * 220 * t[:8000]), 16000)
    make_video(root / "move.mp4", [Fraction(i, 10) for i in range(20)], time_base=Fraction(1, 10), rate=Fraction(10))
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "red.png")
    return root


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


RECORDS = [
    {"audio": "beep.wav", "conversations": turns(("human", "<audio>\nhigh or low?"), ("gpt", "high"))},
    {"audio": ["hum.wav", "beep.wav"], "video": "move.mp4", "image": "red.png",
     "conversations": turns(("human", "<video> then <audio>, <image>, <audio>: which?"), ("gpt", "second"))},
    {"video": "move.mp4", "conversations": turns(("human", "Which way does it move?"), ("gpt", "right"))},
    {"conversations": turns(("human", "hello"), ("gpt", "hi"))},
]


def write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_audio_and_video_fields_parse_with_the_record_policy(tmp_path, folder):
    convs, warnings = read_llava_json(write(tmp_path / "d.json", RECORDS), folder)
    assert warnings == []
    assert convs[0].audio == (str(folder / "beep.wav"),) and convs[0].media == {"audio": convs[0].audio}
    assert set(convs[1].media) == {"image", "audio", "video"} and len(convs[1].audio) == 2
    bad = [{"audio": "beep.wav", "conversations": turns(("human", "<audio><audio> two?"), ("gpt", "no"))},
           {"audio": "absent.wav", "conversations": turns(("human", "x"), ("gpt", "y"))},
           {"video": "move.mp4", "conversations": turns(("human", "x"), ("gpt", "<video> y"))},
           {"audio": [], "conversations": turns(("human", "x"), ("gpt", "y"))}]
    convs, warnings = read_llava_json(write(tmp_path / "bad.json", RECORDS[:1] + bad), folder)
    assert len(convs) == 1
    assert "record 1: the conversation has 2 audio placeholders (<audio>) but 1 audio clip was given" in warnings[0]
    assert "record 2: audio file not found" in warnings[1]
    assert "record 3: a gpt turn contains '<video>'" in warnings[2]
    assert "record 4: 'audio' is an empty list" in warnings[3]
    with pytest.raises(FeatureCountError, match="record 1: the conversation has 2 audio placeholders"):
        read_llava_json(write(tmp_path / "bad.json", RECORDS[:1] + bad), folder, on_error="raise")


def trainer(tmp_path, folder, **kw):
    data = write(tmp_path / "train.json", RECORDS * 3)
    cfg = TrainConfig(**{"model": "tiny-omni-early", "data": "llava", "data_path": str(data), "image_folder": str(folder),
                         "stage": "instruct", "batch_size": 4, "steps": 6, "warmup_steps": 1, "lr": 3e-3,
                         "max_length": 1024, "out_dir": str(tmp_path / "run"), **kw})
    return Trainer(cfg, quiet=True)


def test_media_reach_the_model_in_prompt_order_and_it_trains(tmp_path, folder):
    t = trainer(tmp_path, folder)
    (ex,) = t.reader.examples(t.train_source, [1])
    assert [item.modality for item in ex.images] == ["video", "audio", "image", "audio"]
    assert ex.images[1].num_samples == 8000 and ex.images[3].num_samples == 16000  # hum, then beep
    first = t.train_step(0)
    losses = [t.train_step(s) for s in range(1, 6)]
    assert np.isfinite([first, *losses]).all() and min(losses) < first


@pytest.mark.parametrize("limit, cut", [(20, "an audio clip's"), (80, "a video's")])
def test_truncation_never_cuts_an_audio_or_video_span(tmp_path, folder, limit, cut):
    t = trainer(tmp_path, folder, max_length=limit)
    index = 0 if cut.startswith("an audio") else 2
    assert t.reader.examples(t.train_source, [index]) == []
    assert t.builder.dropped == 1 and f"would cut {cut} tokens" in t.builder.last_drop


def test_diagnostic_media_skills_train_the_chosen_encoders_only(tmp_path):
    from omnifuse.arena.run import DEFAULT_CONFIG

    model = str(DEFAULT_CONFIG.parent / "models" / "arena-early.yaml")
    cfg = TrainConfig(model=model, skills=("colour", "beeps", "motion", "flash"), train_encoder=["audio", "video"],
                      train_size=64, val_size=8, batch_size=4, steps=4, warmup_steps=0, lr=3e-3,
                      out_dir=str(tmp_path))
    trainer = Trainer(cfg, quiet=True)
    assert set(trainer.trainable) == {"connector", "fusion", "decoder", "encoder.audio", "encoder.video"}
    assert trainer.trainable["encoder.audio"] > 0 and trainer.trainable["encoder.video"] > 0
    vision = dict(trainer.model.vision_encoder.named_parameters())
    assert not any(p.requires_grad for p in vision.values())  # the image encoder stays as it was
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = [trainer.train_step(s) for s in range(4)]
    assert all(math.isfinite(x) for x in losses)
    after = dict(trainer.model.named_parameters())
    changed = {n.split(".")[1] for n, p in after.items() if n.startswith("encoders.") and not torch.equal(p, before[n])}
    assert changed == {"audio", "video"}
    scores = trainer.evaluate(trainer.val_source)
    assert {"accuracy/beeps", "accuracy/motion", "accuracy/flash"} <= set(scores)


@pytest.mark.parametrize("settings, words", [
    (dict(model="tiny-early", skills=("colour", "beeps")), "skill beeps needs audio input, which tiny-early does not take"),
    (dict(model="tiny-early", train_encoder=["video"]), "train_encoder needs video input, which tiny-early does not take"),
    (dict(model="tiny-omni-early", stage="contrastive", skills=("colour", "pitch")), "skills .'pitch'. have no image"),
    (dict(train_encoder=["sound"]), "a list of modalities"),
])
def test_media_skills_the_model_cannot_take_are_refused(tmp_path, settings, words):
    with pytest.raises(ValueError, match=words):
        Trainer(TrainConfig(**{"out_dir": str(tmp_path), **settings}), quiet=True)
