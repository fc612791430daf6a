"""The diagnostic set's audio, video and audio-visual skills: each answer is read back from the
waveform or the frames themselves, answers are balanced, splits disjoint, and the clips reach a
model as the media it takes."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from omnifuse.training.diagnostic import (
    BACKGROUND,
    IMAGE_SKILLS,
    MEDIA_SKILLS,
    SKILLS,
    DiagnosticSet,
    answer_set,
    chance_level,
    skill_media,
)
from omnifuse.training.diagnostic_media import AUDIO_RATE, CLIP_FRAMES, CLIP_SECONDS, FRAME_RATE


def samples(skill: str, n: int = 60, split: str = "val", seed: int = 0):
    data = DiagnosticSet(split, n, seed=seed, skills=(skill,))
    return [(data.key(i), data[i]) for i in range(n)]


def loud(wave: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Per 5 ms block: does the waveform rise above the threshold (a tone sounds)?"""
    hop = AUDIO_RATE // 200
    return np.abs(wave[: len(wave) // hop * hop]).reshape(-1, hop).max(axis=1) > threshold


def tone_runs(wave: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) 5 ms block of each stretch of sound."""
    on = loud(wave)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2] - 1))


def peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / AUDIO_RATE)[spectrum.argmax()])


def ink(frame) -> np.ndarray:
    return np.any(np.asarray(frame) != np.array(BACKGROUND, np.uint8), axis=-1)


def test_media_skills_need_their_modalities_and_have_chance_levels():
    assert SKILLS == IMAGE_SKILLS + MEDIA_SKILLS
    assert {s: skill_media(s) for s in MEDIA_SKILLS} == {
        "beeps": ("audio",), "pitch": ("audio",), "motion": ("video",), "order": ("video",), "flash": ("audio", "video")}
    assert skill_media("ocr") == ("image",)
    assert {s: chance_level(s) for s in MEDIA_SKILLS} == pytest.approx(
        {"beeps": 1 / 5, "pitch": 1 / 2, "motion": 1 / 4, "order": 1 / 3, "flash": 1 / 3})
    assert DiagnosticSet("train", 5).skills == IMAGE_SKILLS  # image-only models keep their default


@pytest.mark.parametrize("skill", MEDIA_SKILLS)
def test_clips_have_the_documented_shape(skill):
    for _, s in samples(skill, 12):
        assert s.images == () and s.answer in answer_set(skill) and s.skill == skill
        assert set(s.media) == set(skill_media(skill))
        for wave, rate in s.audio:
            assert rate == AUDIO_RATE and wave.dtype == np.float32 and len(wave) == CLIP_SECONDS * AUDIO_RATE
            assert np.abs(wave).max() < 1.0
        for frames, rate in s.video:
            assert rate == FRAME_RATE and len(frames) == CLIP_FRAMES
            assert all(f.mode == "RGB" and f.size == (64, 64) for f in frames)


def test_beeps_answer_is_the_number_of_beeps_heard():
    for _, s in samples("beeps", 80):
        runs = tone_runs(s.audio[0][0])
        assert len(runs) == int(s.answer)
        gaps = [b[0] - a[1] - 1 for a, b in itertools.pairwise(runs)]
        assert all(g * 5 >= 100 for g in gaps)  # at least 100 ms of silence between beeps


def test_pitch_answer_names_the_higher_tone():
    for _, s in samples("pitch", 60):
        wave = s.audio[0][0]
        (a0, a1), (b0, b1) = tone_runs(wave)
        hop = AUDIO_RATE // 200
        first, second = peak_hz(wave[a0 * hop:(a1 + 1) * hop]), peak_hz(wave[b0 * hop:(b1 + 1) * hop])
        assert s.answer == ("first" if first > second else "second")
        assert abs(np.log2(first / second)) > 0.4  # well apart: not a near-tie


def test_motion_answer_is_the_direction_the_ink_moves():
    for _, s in samples("motion", 60):
        centres = [np.argwhere(ink(f)).mean(axis=0) for f in s.video[0][0]]  # (y, x)
        dy, dx = np.diff(np.array(centres), axis=0).T
        expected = {"left": dx < -3, "right": dx > 3, "up": dy < -3, "down": dy > 3}[s.answer]
        assert expected.all(), (s.answer, centres)
        across = np.abs(dy if s.answer in ("left", "right") else dx)
        assert across.max() < 0.5  # it moves along one axis only


def test_order_answer_is_the_shape_that_appears_first():
    for key, s in samples("order", 60):
        _, a, b, t_a, t_b = key
        assert s.answer == a[0] and a[0] != b[0] and t_a < t_b
        frames = s.video[0][0]

        def inside(shape, frame) -> bool:
            _, _, x, y, side = shape
            return bool(ink(frame)[y:y + side, x:x + side].any())

        shown_a = [inside(a, f) for f in frames]
        shown_b = [inside(b, f) for f in frames]
        assert shown_a == [k >= t_a for k in range(CLIP_FRAMES)]
        assert shown_b == [k >= t_b for k in range(CLIP_FRAMES)]


def test_flash_answer_is_the_shape_black_while_the_beep_sounds():
    for key, s in samples("flash", 60):
        _, a, b, t_a, t_b = key
        (start, end), = tone_runs(s.audio[0][0])
        frame_at_beep = int(start * 5 / 1000 * FRAME_RATE)
        assert frame_at_beep == int(end * 5 / 1000 * FRAME_RATE)  # the beep lies within one frame
        frame = np.asarray(s.video[0][0][frame_at_beep])
        black = np.all(frame < 40, axis=-1)
        for shape in (a, b):
            _, _, x, y, side = shape
            flashing = black[y:y + side, x:x + side].any()
            assert flashing == (shape[0] == s.answer)
        assert s.answer == a[0] and t_a == frame_at_beep and t_b != t_a


@pytest.mark.parametrize("skill", MEDIA_SKILLS)
def test_answers_are_balanced(skill):
    counts = Counter(s.answer for _, s in samples(skill, 600, split="train"))
    expected = 600 / len(answer_set(skill))
    assert set(counts) == set(answer_set(skill))
    assert all(abs(c - expected) < 0.3 * expected for c in counts.values()), counts


def test_media_splits_share_no_sample_and_repeat_exactly():
    keys = {split: {DiagnosticSet(split, 1000, skills=MEDIA_SKILLS).key(i) for i in range(1000)}
            for split in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    a, b = DiagnosticSet("test", 10, skills=MEDIA_SKILLS), DiagnosticSet("test", 10, skills=MEDIA_SKILLS)
    for i in range(10):
        x, y = a[i], b[i]
        assert [w.tobytes() for w, _ in x.audio] == [w.tobytes() for w, _ in y.audio]
        assert [[f.tobytes() for f in fs] for fs, _ in x.video] == [[f.tobytes() for f in fs] for fs, _ in y.video]


def test_clips_reach_the_arena_model_as_its_media():
    from omnifuse.arena.run import DEFAULT_CONFIG
    from omnifuse.modalities import build_audio_processor, build_video_processor
    from omnifuse.training.config import TrainConfig
    from omnifuse.training.loop import _resolve_model_config
    from omnifuse.training.sources import DiagnosticSource

    config = _resolve_model_config(str(DEFAULT_CONFIG.parent / "models" / "arena-early.yaml"))
    source = DiagnosticSource("val", 11, TrainConfig(skills=SKILLS))
    _turns, media, meta = source[10]
    assert meta["skill"] == "flash" and set(media) == {"audio", "video"}
    audio, video = build_audio_processor(config)(media["audio"][0]), build_video_processor(config)(media["video"][0])
    assert audio.num_tokens == 20 * CLIP_SECONDS  # 20 tokens per second
    assert video.timestamps == (0.0, 0.5, 1.0, 1.5) and video.num_tokens == 16 * CLIP_FRAMES
    assert source[0][1] and isinstance(source[0][1], list)  # image samples: a list of images, as before
