"""The diagnostic set's audio, video and audio-visual skills: synthetic clips with one-word answers.

Every clip lasts ``CLIP_SECONDS``: audio is a mono ``AUDIO_RATE`` Hz waveform of sine tones over a
faint noise floor; video is ``CLIP_FRAMES`` Pillow frames shown at ``FRAME_RATE`` frames per
second, kept in memory as ``(frames, FRAME_RATE)`` (``processing/video.py`` samples them by the same
contract as a file). Each skill probes something a model must carry from the clip to its answer:

- ``beeps`` (audio): how many identical beeps, 1-5 (events kept apart in time);
- ``pitch`` (audio): which of two tones is higher, ``first`` or ``second`` (frequency, and order);
- ``motion`` (video): which way one shape moves across the frames, left / right / up / down
  (position across frames: needs the frames' order);
- ``order`` (video): which of two shapes appears first (time of appearance);
- ``flash`` (audio-visual): two shapes each flash once (drawn black for one frame); which one
  flashes while the beep sounds. Neither stream alone answers it: the video narrows it to two
  shapes, the audio says when.

Keys hold only ints and strings (times in milliseconds, frequencies in Hz), so their repr, which
splits the data, is stable.
"""

from __future__ import annotations

import hashlib
import math
import random

from PIL import Image

from omnifuse.training.synth import COLOURS, SHAPES, Shape, canvas, draw_shape, side_range, tones

__all__ = ["AUDIO_RATE", "CLIP_FRAMES", "CLIP_SECONDS", "FRAME_RATE", "MEDIA_ANSWERS", "MEDIA_QUESTIONS",
           "SKILL_MEDIA", "draw_key", "render"]

AUDIO_RATE = 16000
FRAME_RATE = 2.0
CLIP_FRAMES = 4
CLIP_SECONDS = CLIP_FRAMES / FRAME_RATE  # audio clips last as long as the video clips

DIRECTIONS = ("left", "right", "up", "down")
MEDIA_ANSWERS = {
    "beeps": ("1", "2", "3", "4", "5"),
    "pitch": ("first", "second"),
    "motion": DIRECTIONS,
    "order": SHAPES,
    "flash": SHAPES,
}
MEDIA_QUESTIONS = {
    "beeps": "how many beeps are there?",
    "pitch": "which tone is higher, the first or the second?",
    "motion": "which way does the shape move?",
    "order": "which shape appears first?",
    "flash": "which shape flashes when the beep sounds?",
}
SKILL_MEDIA = {"beeps": ("audio",), "pitch": ("audio",), "motion": ("video",), "order": ("video",),
               "flash": ("audio", "video")}

_EDGE_MS = 50  # no tone starts before or ends after this much of the clip's edges
_BEEP_MS = (60, 100)
_BEEP_GAP_MS = 120  # > 2 x 50 ms: with 10 ms mel frames at least one silent frame group between beeps
_BEEP_HZ = (500, 1500)
_TONE_MS = (400, 600)
_TONE_GAP_MS = 200
_TONE_HZ = (300, 2400)
_MIN_OCTAVES = 0.5  # the two tones of ``pitch`` are at least half an octave apart
_FLASH_BEEP = (100, 200, 1000)  # ms into the flash frame, ms long, Hz
_SHAPE = (0.19, 0.31)  # shape sides as fractions of the frame side (12-20 px at 64)
_STEP = (0.09, 0.16)  # motion per frame, fraction of the frame side (6-10 px at 64)
_BLACK = (20, 20, 20)


def draw_key(skill: str, rng: random.Random, n: int) -> tuple:
    """The generating parameters of one ``skill`` sample with ``n``-pixel frames."""
    clip_ms = round(1000 * CLIP_SECONDS)
    if skill == "beeps":
        count = rng.randint(1, len(MEDIA_ANSWERS["beeps"]))
        length = rng.randint(*_BEEP_MS)
        slack = clip_ms - 2 * _EDGE_MS - count * length - (count - 1) * _BEEP_GAP_MS
        cuts = sorted(rng.randint(0, slack) for _ in range(count))  # extra silence before each beep
        starts = tuple(_EDGE_MS + c + k * (length + _BEEP_GAP_MS) for k, c in enumerate(cuts))
        return ("beeps", rng.randint(*_BEEP_HZ), length, starts)
    if skill == "pitch":
        lo, hi = math.log2(_TONE_HZ[0]), math.log2(_TONE_HZ[1])
        while True:
            a, b = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if abs(a - b) >= _MIN_OCTAVES:
                break
        return ("pitch", round(2 ** a), round(2 ** b), rng.randint(*_TONE_MS))
    if skill == "motion":
        direction = rng.choice(DIRECTIONS)
        side = rng.randint(*side_range(n, _SHAPE))
        step = rng.randint(*side_range(n, _STEP))
        margin = max(1, n // 32)
        travel = step * (CLIP_FRAMES - 1)
        along = rng.randint(margin, n - margin - side - travel)
        across = rng.randint(margin, n - margin - side)
        if direction in ("left", "up"):
            along += travel  # it starts at the far end and moves back
        x, y = (along, across) if direction in ("left", "right") else (across, along)
        return ("motion", direction, (rng.choice(SHAPES), rng.choice(tuple(COLOURS)), x, y, side), step)
    # order and flash: two distinct shapes, one in each half, which half is whose at random
    a, b = _pair(rng, n)
    if skill == "order":
        t_a = rng.randint(0, CLIP_FRAMES - 2)
        return ("order", a, b, t_a, rng.randint(t_a + 1, CLIP_FRAMES - 1))
    t_a, t_b = rng.sample(range(CLIP_FRAMES), 2)
    return ("flash", a, b, t_a, t_b)


def _pair(rng: random.Random, n: int) -> tuple[Shape, Shape]:
    half, margin = n // 2, max(1, n // 32)
    names = rng.sample(SHAPES, 2)
    shapes = []
    for k in range(2):
        side = rng.randint(*side_range(n, _SHAPE))
        x = rng.randint(k * half + margin, (k + 1) * half - margin - side)
        y = rng.randint(margin, n - margin - side)
        shapes.append((x, y, side))
    if rng.random() < 0.5:
        shapes.reverse()
    return tuple((name, rng.choice(tuple(COLOURS)), *box) for name, box in zip(names, shapes))  # type: ignore[return-value]


def _noise_seed(key: tuple) -> int:
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big")


def _frames(n: int, draw) -> list[Image.Image]:
    out = []
    for k in range(CLIP_FRAMES):
        img, d = canvas(n)
        draw(k, d)
        out.append(img)
    return out


def render(key: tuple, n: int) -> tuple[str, str, tuple, tuple]:
    """(question, answer, audio clips, video clips) of ``key``: audio clips as ``(waveform,
    AUDIO_RATE)``, video clips as ``(frames, FRAME_RATE)``."""
    skill = key[0]
    question = MEDIA_QUESTIONS[skill]
    if skill == "beeps":
        _, hz, length, starts = key
        wave = tones(CLIP_SECONDS, AUDIO_RATE, [(s, length, hz) for s in starts], _noise_seed(key))
        return question, str(len(starts)), ((wave, AUDIO_RATE),), ()
    if skill == "pitch":
        _, hz_1, hz_2, length = key
        first = 150
        parts = [(first, length, hz_1), (first + length + _TONE_GAP_MS, length, hz_2)]
        wave = tones(CLIP_SECONDS, AUDIO_RATE, parts, _noise_seed(key))
        return question, "first" if hz_1 > hz_2 else "second", ((wave, AUDIO_RATE),), ()
    if skill == "motion":
        _, direction, (name, colour, x, y, side), step = key
        dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
        frames = _frames(n, lambda k, d: draw_shape(d, (name, colour, x + k * dx, y + k * dy, side)))
        return question, direction, (), ((frames, FRAME_RATE),)
    if skill == "order":
        _, a, b, t_a, t_b = key

        def appear(k, d):
            for shape, t in ((a, t_a), (b, t_b)):
                if k >= t:
                    draw_shape(d, shape)
        return question, a[0], (), ((_frames(n, appear), FRAME_RATE),)
    _, a, b, t_a, t_b = key

    def flash(k, d):
        for shape, t in ((a, t_a), (b, t_b)):
            draw_shape(d, shape, _BLACK if k == t else None)
    offset, length, hz = _FLASH_BEEP
    wave = tones(CLIP_SECONDS, AUDIO_RATE, [(round(1000 * t_a / FRAME_RATE) + offset, length, hz)], _noise_seed(key))
    return question, a[0], ((wave, AUDIO_RATE),), ((_frames(n, flash), FRAME_RATE),)

