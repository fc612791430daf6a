"""The built-in diagnostic data set: small synthetic questions about images, audio and video for
comparing fusion strategies.

Every sample is drawn (Pillow shapes, numpy tones) from a handful of generating parameters, so the
set needs no download, is reproducible from ``(split, seed, index)`` and is as large as asked. Each
image skill probes something different a fusion strategy must carry from the image to the
language model:

- ``colour`` / ``shape``: one attribute of one object (global appearance);
- ``spatial``: how two objects lie relative to each other (needs positions, not a bag of features);
- ``counting``: 1-6 identical objects (needs several patches kept apart);
- ``ocr``: two large letters (fine detail, and their order);
- ``compare``: two images, same colour or same shape (needs both images at once).

The audio (``beeps``, ``pitch``), video (``motion``, ``order``) and audio-visual (``flash``) skills
are described in ``training/diagnostic_media.py``; ``skill_media(skill)`` names what each needs.
The text-only long-context skills ``recall-N`` (a key, ``N`` tokens of distractors, the question)
are in ``training/diagnostic_text.py``.

Answers are one short lowercase word (a digit for recall-N), scored by exact match. They are
drawn uniformly from ``answer_set(skill)``, so ``chance_level(skill)`` is also what a model that
ignores the media and only learns the answer prior can reach.

Splits never share a sample: the generating parameters of a sample (its *key*) are hashed into ten
buckets, 0-7 train, 8 val, 9 test, and each split rejection-samples keys from its own buckets. This
holds for any sizes and seeds, unlike disjoint index ranges or per-split seeds alone.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from omnifuse.errors import ConfigError
from omnifuse.training import diagnostic_media, diagnostic_text
from omnifuse.training.synth import BACKGROUND, COLOURS, SHAPES, Shape, canvas, draw_shape, side_range

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "IMAGE_SKILLS",
    "MEDIA_SKILLS",
    "SHAPES",
    "SKILLS",
    "SPLITS",
    "DiagnosticSet",
    "Sample",
    "answer_set",
    "chance_level",
    "skill_media",
]

IMAGE_SKILLS = ("colour", "shape", "spatial", "counting", "ocr", "compare")
MEDIA_SKILLS = tuple(diagnostic_media.SKILL_MEDIA)  # beeps, pitch, motion, order, flash
SKILLS = IMAGE_SKILLS + MEDIA_SKILLS
SPLITS = ("train", "val", "test")

RELATIONS = ("left", "right", "above", "below")
COUNTS = ("1", "2", "3", "4", "5", "6")
# A small alphabet and two letters keep OCR learnable for a tiny model in the demo's budget (8**2 = 64
# answers); three letters (512) stayed near chance at 1,500 mixed steps.
OCR_ALPHABET = "ABCDEFGH"
OCR_LENGTH = 2
# Yellow and orange text on the light background is hard to read at 64 px; text uses darker inks.
TEXT_COLOURS = {"black": (20, 20, 20), "red": COLOURS["red"], "green": COLOURS["green"],
                "blue": COLOURS["blue"], "purple": COLOURS["purple"]}

_BUCKETS = {"train": frozenset(range(8)), "val": frozenset({8}), "test": frozenset({9})}
_MIN_IMAGE_SIZE = 32  # below this, six counting shapes or three letters no longer fit legibly
_MAX_TRIES = 10_000  # rejection sampling; a val/test key needs about 10 draws on average
_GAP = 2  # pixels between counting shapes, so each is its own connected blob

# Shape sides as fractions of the image side: at 64 px, 16-28 (one object), 12-20 (two objects,
# each in its own half) and 9-13 (up to six objects) pixels, i.e. at least one 8-pixel patch.
_BIG = (0.25, 0.44)
_MEDIUM = (0.19, 0.31)
_SMALL = (0.14, 0.20)
_FONT = (0.42, 0.55)


def _check_skill(skill: str) -> None:
    if skill not in SKILLS and not diagnostic_text.is_recall_skill(skill):
        raise ConfigError(f"unknown skill {skill!r}; expected one of {SKILLS} or recall-N (N distractor tokens, "
                          f"1 to {diagnostic_text.MAX_DISTANCE})")


@functools.cache
def answer_set(skill: str) -> tuple[str, ...]:
    """Every answer ``skill`` can have (for ``ocr`` all 64 two-letter strings, lowercase)."""
    _check_skill(skill)
    if skill in MEDIA_SKILLS:
        return diagnostic_media.MEDIA_ANSWERS[skill]
    if diagnostic_text.is_recall_skill(skill):
        return diagnostic_text.recall_answers()
    if skill == "colour":
        return tuple(COLOURS)
    if skill == "shape":
        return SHAPES
    if skill == "spatial":
        return RELATIONS
    if skill == "counting":
        return COUNTS
    if skill == "ocr":
        return tuple("".join(t).lower() for t in itertools.product(OCR_ALPHABET, repeat=OCR_LENGTH))
    return ("yes", "no")


def chance_level(skill: str) -> float:
    """Probability that a uniform guess over ``answer_set(skill)`` is right."""
    return 1.0 / len(answer_set(skill))


def skill_media(skill: str) -> tuple[str, ...]:
    """The modalities a ``skill`` sample carries (and a model needs to answer it)."""
    _check_skill(skill)
    if diagnostic_text.is_recall_skill(skill):
        return ()
    return diagnostic_media.SKILL_MEDIA.get(skill, ("image",))


@dataclass(frozen=True)
class Sample:
    images: tuple[Image.Image, ...]  # RGB, image_size x image_size; two for "compare", one for the
    # other image skills, none for the media and recall skills
    question: str  # plain text without media placeholders: the prompt builder adds those
    answer: str  # one short lowercase word, a member of answer_set(skill)
    skill: str
    audio: tuple = ()  # (waveform, sampling rate) clips
    video: tuple = ()  # (frames, frame rate) clips, image_size x image_size frames

    @property
    def media(self) -> dict[str, list]:
        """{modality: sources} of the modalities this sample has."""
        return {m: list(v) for m, v in (("image", self.images), ("audio", self.audio), ("video", self.video)) if v}


# ---------------------------------------------------------------------------------------------
# Drawing

@functools.cache
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        # Pillow < 10.1 has no `size`, and without FreeType there is no scalable font: the caller
        # then enlarges the fixed bitmap font instead.
        return None


def _text_mask(text: str, size: int) -> Image.Image:
    """An "L" mask of ``text`` cropped to its ink, about ``size`` pixels tall."""
    font = _font(size)
    scale = 1
    if font is None:
        font = ImageFont.load_default()
        scale = max(1, round(size / 11))  # the bitmap font is about 11 pixels tall
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    if scale > 1:
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)
    return mask


# ---------------------------------------------------------------------------------------------
# The data set


class DiagnosticSet:
    """``size`` synthetic samples of ``split`` (the image skills unless ``skills`` names others); the
    skills take turns: sample ``i`` has skill
    ``cycle[i % len(cycle)]``, where the cycle lists each skill ``weights.get(skill, 1)`` times (so a
    weight of 2 gives a skill twice the samples of the others).

    Samples are generated on access and depend only on ``(split, seed, i, image_size, skills, weights)``.
    """

    def __init__(self, split: str, size: int, seed: int = 0, image_size: int = 64,
                 skills: Iterable[str] = IMAGE_SKILLS, weights: dict[str, int] | None = None):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size < 0:
            raise ConfigError(f"size must be a non-negative integer, got {size!r}")
        if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
            raise ConfigError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
        skills = tuple(skills)
        if not skills:
            raise ConfigError("skills must name at least one skill")
        for skill in skills:
            _check_skill(skill)
        if len(set(skills)) != len(skills):
            raise ConfigError(f"skills has duplicates: {skills}")
        weights = dict(weights or {})
        for skill, w in weights.items():
            if skill not in skills:
                raise ConfigError(f"weights names {skill!r}, which is not among the skills {skills}")
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ConfigError(f"the weight of {skill!r} must be a positive integer, got {w!r}")
        self.split, self.size, self.seed = split, size, int(seed)
        self.image_size, self.skills = image_size, skills
        self.cycle = tuple(skill for skill in skills for _ in range(weights.get(skill, 1)))

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"DiagnosticSet(split={self.split!r}, size={self.size}, seed={self.seed}, "
                f"image_size={self.image_size}, skills={self.skills})")

    def _index(self, i: int) -> int:
        if not isinstance(i, int):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} samples")
        return i % self.size

    def key(self, i: int) -> tuple:
        """The generating parameters of sample ``i``: equal keys mean equal samples."""
        i = self._index(i)
        skill = self.cycle[i % len(self.cycle)]
        # A string seed goes through SHA-512 in `random`, so streams are stable across runs and
        # unrelated across (seed, split, i); Python's salted hash() would not be.
        rng = random.Random(f"omnifuse.diagnostic/{self.seed}/{self.split}/{i}")
        # The compare answer is fixed by the index, not drawn, so yes/no and colour/shape are
        # exactly balanced over every four compare samples.
        turn = i // len(self.cycle)
        buckets = _BUCKETS[self.split]
        for _ in range(_MAX_TRIES):
            key = self._draw_key(skill, rng, turn)
            if _bucket(key) in buckets:
                return key
        raise RuntimeError(f"no {self.split} key for {skill} sample {i} after {_MAX_TRIES} draws")

    def __getitem__(self, i: int) -> Sample:
        key = self.key(i)
        return _render(key, self.image_size)

    # --- generating parameters ---------------------------------------------------------------

    def _shape(self, rng: random.Random, frac, name=None, colour=None) -> Shape:
        n = self.image_size
        lo, hi = side_range(n, frac)
        side = rng.randint(lo, hi)
        margin = max(1, n // 32)
        return (name or rng.choice(SHAPES), colour or rng.choice(tuple(COLOURS)),
                rng.randint(margin, n - margin - side), rng.randint(margin, n - margin - side), side)

    def _draw_key(self, skill: str, rng: random.Random, turn: int) -> tuple:
        if skill in MEDIA_SKILLS:
            return diagnostic_media.draw_key(skill, rng, self.image_size)
        if diagnostic_text.is_recall_skill(skill):
            return diagnostic_text.draw_key(skill, rng)
        if skill in ("colour", "shape"):
            return (skill, self._shape(rng, _BIG))
        if skill == "spatial":
            return self._spatial(rng)
        if skill == "counting":
            return self._counting(rng)
        if skill == "ocr":
            return self._ocr(rng)
        attribute = ("colour", "shape")[turn % 2]
        same = (turn // 2) % 2 == 0
        a = self._shape(rng, _BIG)
        if attribute == "colour":
            colour = a[1] if same else rng.choice([c for c in COLOURS if c != a[1]])
            b = self._shape(rng, _BIG, colour=colour)
        else:
            name = a[0] if same else rng.choice([s for s in SHAPES if s != a[0]])
            b = self._shape(rng, _BIG, name=name)
        return ("compare", attribute, a, b)

    def _spatial(self, rng: random.Random) -> tuple:
        n, half = self.image_size, self.image_size // 2
        margin = max(1, n // 32)
        relation = rng.choice(RELATIONS)
        name_a, name_b = rng.sample(SHAPES, 2)  # distinct, so "the circle" names one object
        lo, hi = side_range(n, _MEDIUM)
        while True:
            s_a, s_b = rng.randint(lo, hi), rng.randint(lo, hi)
            # Along the relation's axis `a` sits in one half and `b` in the other; across it the
            # centres may differ by at most half their distance along it, so the answer is clear.
            first, second = (s_a, s_b) if relation in ("left", "above") else (s_b, s_a)
            p1 = rng.randint(margin, half - first)
            p2 = rng.randint(half, n - margin - second)
            q1 = rng.randint(margin, n - margin - first)
            q2 = rng.randint(margin, n - margin - second)
            along = (p2 + second / 2) - (p1 + first / 2)
            across = (q2 + second / 2) - (q1 + first / 2)
            if abs(across) <= along / 2:
                break
        (pa, qa), (pb, qb) = ((p1, q1), (p2, q2)) if relation in ("left", "above") else ((p2, q2), (p1, q1))
        if relation in ("left", "right"):  # p is x, q is y
            xy_a, xy_b = (pa, qa), (pb, qb)
        else:
            xy_a, xy_b = (qa, pa), (qb, pb)
        colours = tuple(COLOURS)
        a = (name_a, rng.choice(colours), *xy_a, s_a)
        b = (name_b, rng.choice(colours), *xy_b, s_b)
        return ("spatial", relation, a, b)

    def _counting(self, rng: random.Random) -> tuple:
        count = rng.randint(1, len(COUNTS))
        name, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        while True:  # restart the layout when the last shapes no longer find room
            boxes: list[tuple[int, int, int]] = []
            for _ in range(200):
                if len(boxes) == count:
                    break
                _, _, x, y, side = self._shape(rng, _SMALL, name, colour)
                if all(x + side + _GAP <= bx or bx + bs + _GAP <= x or
                       y + side + _GAP <= by or by + bs + _GAP <= y for bx, by, bs in boxes):
                    boxes.append((x, y, side))
            if len(boxes) == count:
                # Sorted: the drawing order does not change the image, so it is not part of the key.
                return ("counting", name, colour, tuple(sorted(boxes)))

    def _ocr(self, rng: random.Random) -> tuple:
        n = self.image_size
        margin = max(1, n // 32)
        text = "".join(rng.choice(OCR_ALPHABET) for _ in range(OCR_LENGTH))
        colour = rng.choice(tuple(TEXT_COLOURS))
        size = rng.randint(*side_range(n, _FONT))
        mask = _text_mask(text, size)
        while size > 6 and (mask.width > n - 2 * margin or mask.height > n - 2 * margin):
            size -= 1
            mask = _text_mask(text, size)
        x = rng.randint(margin, max(margin, n - margin - mask.width))
        y = rng.randint(margin, max(margin, n - margin - mask.height))
        return ("ocr", text, colour, size, x, y)


def _bucket(key: tuple) -> int:
    """0-9 from the key's content; repr of nested tuples of str and int is stable across runs."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10


def _render(key: tuple, n: int) -> Sample:
    skill = key[0]
    if skill in MEDIA_SKILLS:
        question, answer, audio, video = diagnostic_media.render(key, n)
        return Sample((), question, answer, skill, audio=audio, video=video)
    if diagnostic_text.is_recall_skill(skill):
        return Sample((), *diagnostic_text.render(key), skill)
    if skill in ("colour", "shape"):
        shape = key[1]
        img, draw = canvas(n)
        draw_shape(draw, shape)
        if skill == "colour":
            return Sample((img,), "what colour is the shape?", shape[1], skill)
        return Sample((img,), "what shape is it?", shape[0], skill)
    if skill == "spatial":
        _, relation, a, b = key
        img, draw = canvas(n)
        draw_shape(draw, a)
        draw_shape(draw, b)
        return Sample((img,), f"where is the {a[0]} relative to the {b[0]}?", relation, skill)
    if skill == "counting":
        _, name, colour, boxes = key
        img, draw = canvas(n)
        for x, y, side in boxes:
            draw_shape(draw, (name, colour, x, y, side))
        return Sample((img,), "how many shapes are there?", str(len(boxes)), skill)
    if skill == "ocr":
        _, text, colour, size, x, y = key
        img, _ = canvas(n)
        mask = _text_mask(text, size)
        img.paste(TEXT_COLOURS[colour], (x, y, x + mask.width, y + mask.height), mask)
        return Sample((img,), "what does the text say?", text.lower(), skill)
    _, attribute, a, b = key
    images = []
    for shape in (a, b):
        img, draw = canvas(n)
        draw_shape(draw, shape)
        images.append(img)
    index = 1 if attribute == "colour" else 0
    answer = "yes" if a[index] == b[index] else "no"
    return Sample(tuple(images), f"are the two shapes the same {attribute}?", answer, skill)


def caption(key: tuple) -> str:
    """A plain description of a sample's first image from its generating key (for the contrastive
    stage): every attribute the skills ask about is named, so image-text pre-training learns them."""
    kind = key[0]
    if kind in MEDIA_SKILLS or diagnostic_text.is_recall_skill(kind):
        raise ConfigError(f"captions describe images; the {kind} skill has none (contrastive pre-training takes "
                          f"the image skills {IMAGE_SKILLS})")
    if kind in ("colour", "shape"):
        name, colour = key[1][:2]
        return f"{colour} {name}"
    if kind == "spatial":
        relation, a, b = key[1:]
        return f"{a[1]} {a[0]} {relation} {b[1]} {b[0]}"
    if kind == "counting":
        return f"{len(key[3])} {key[2]} {key[1]}"
    if kind == "ocr":
        return f"text {' '.join(key[1])}"
    a = key[2]  # compare: describe the first image
    return f"{a[1]} {a[0]}"
