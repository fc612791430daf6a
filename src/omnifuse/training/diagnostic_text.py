"""The diagnostic set's long-context skill: a key stated once, early, then asked for after
distractor text.

``recall-N`` (e.g. ``recall-256``) samples read ``key: 7.`` followed by exactly ``N`` characters of
distractor words, then the question ``what is the key?``; the answer is the key. With a byte
tokenizer ``N`` is the fact's distance from the question in tokens, so a model whose attention does
not reach back ``N`` positions (a sliding window narrower than ``N`` times the depth) can only
guess, while full attention or a compressive memory can carry the key across. A key is one digit
(10 answers); distractor words are lowercase letters, so no distractor can be mistaken for a key
and none spells ``key``. A tiny model trained from scratch finds the key by what it is: two-letter
keys among letter words stayed at chance after 800 steps, and two-digit keys were learnt by full
attention but by neither bounded kind, which then also had the digits' order to carry.

Keys hold only ints and strings, so their repr, which splits the data, is stable.
"""

from __future__ import annotations

import random
import re

__all__ = ["KEY_ALPHABET", "RECALL_QUESTION", "is_recall_skill", "recall_answers", "recall_distance", "render"]

KEY_ALPHABET = "0123456789"
RECALL_QUESTION = "what is the key?"
MAX_DISTANCE = 100_000  # characters of distractors; beyond any context the models here are given
_WORD_LETTERS = "abcdefghijlmnopqrstuvwxz"  # without k and y: no "key"
_WORD_LENGTH = (2, 7)
_PATTERN = re.compile(r"recall-([0-9]+)")


def recall_distance(skill: str) -> int | None:
    """``N`` of a ``recall-N`` skill name, None for any other name (or an ``N`` out of range)."""
    m = _PATTERN.fullmatch(skill)
    if m is None or m.group(1).startswith("0"):
        return None
    n = int(m.group(1))
    return n if n <= MAX_DISTANCE else None


def is_recall_skill(skill: str) -> bool:
    return recall_distance(skill) is not None


def recall_answers() -> tuple[str, ...]:
    return tuple(KEY_ALPHABET)


def draw_key(skill: str, rng: random.Random) -> tuple:
    """The generating parameters of one ``recall-N`` sample: the key and the distractors' seed."""
    return (skill, rng.choice(KEY_ALPHABET), rng.getrandbits(48))


def _distractors(n: int, seed: int) -> str:
    """Exactly ``n`` characters of space-separated pseudo-words drawn from ``_WORD_LETTERS``."""
    rng = random.Random(seed)
    words, length = [], -1  # the joined length: the words and a space between each two
    while length < n:
        word = "".join(rng.choice(_WORD_LETTERS) for _ in range(rng.randint(*_WORD_LENGTH)))
        words.append(word)
        length += 1 + len(word)
    text = " ".join(words)[:n]
    return text if not text.endswith(" ") else text[:-1] + "o"  # no space before the question's own


def render(key: tuple) -> tuple[str, str]:
    """(question, answer) of a ``recall-N`` key: the key's statement, ``N`` characters of
    distractors, the question."""
    skill, answer, seed = key
    n = recall_distance(skill)
    return f"key: {answer}. {_distractors(n, seed)} {RECALL_QUESTION}", answer
