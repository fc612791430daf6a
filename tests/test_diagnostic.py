"""The diagnostic set: reproducible, split-disjoint, balanced, and each answer true of its image."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from omnifuse.training.diagnostic import (
    BACKGROUND,
    COLOURS,
    IMAGE_SKILLS,
    OCR_ALPHABET,
    OCR_LENGTH,
    SHAPES,
    DiagnosticSet,
    Sample,
    answer_set,
    chance_level,
)


def pixels(sample: Sample) -> list[bytes]:
    return [img.tobytes() for img in sample.images]


def components(img) -> int:
    """Connected blobs (8-neighbour) of non-background pixels, by flood fill."""
    ink = np.any(np.asarray(img) != np.array(BACKGROUND, dtype=np.uint8), axis=-1)  # (H, W)
    seen = np.zeros_like(ink)
    h, w = ink.shape
    count = 0
    for y0, x0 in zip(*np.nonzero(ink)):
        if seen[y0, x0]:
            continue
        count += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and ink[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def dominant_colour(img) -> tuple[int, int, int]:
    counts = Counter(map(tuple, np.asarray(img).reshape(-1, 3).tolist()))
    counts.pop(BACKGROUND, None)
    return counts.most_common(1)[0][0]


def test_same_seed_same_samples_in_any_order():
    a, b = DiagnosticSet("train", 60, seed=3), DiagnosticSet("train", 60, seed=3)
    backwards = [b[i] for i in reversed(range(60))][::-1]
    for i in range(60):
        x, y = a[i], backwards[i]
        assert (x.question, x.answer, x.skill) == (y.question, y.answer, y.skill)
        assert pixels(x) == pixels(y)
    assert pixels(a[-1]) == pixels(a[59])


def test_different_seeds_give_different_samples():
    a, b = DiagnosticSet("train", 60, seed=0), DiagnosticSet("train", 60, seed=1)
    differing = sum(pixels(a[i]) != pixels(b[i]) for i in range(60))
    assert differing >= 55  # a few tiny answer sets may coincide by chance, not most samples


def test_splits_share_no_sample():
    keys = {split: {DiagnosticSet(split, 2000, seed=0).key(i) for i in range(2000)}
            for split in ("train", "val", "test")}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    assert all(len(k) > 1900 for k in keys.values())  # the parameter space is not exhausted


def test_skills_round_robin_answers_in_answer_set_and_images_shaped():
    data = DiagnosticSet("val", 120, seed=0, image_size=48)
    seen = Counter()
    for i in range(len(data)):
        s = data[i]
        assert s.skill == IMAGE_SKILLS[i % len(IMAGE_SKILLS)]
        assert s.answer in answer_set(s.skill) and s.answer == s.answer.lower()
        assert "<image>" not in s.question
        assert len(s.images) == (2 if s.skill == "compare" else 1)
        for img in s.images:
            assert img.mode == "RGB" and img.size == (48, 48)
            assert components(img) >= 1  # something is drawn
        seen[s.skill] += 1
    assert set(seen) == set(IMAGE_SKILLS) and len(set(seen.values())) == 1


def test_skills_subset():
    data = DiagnosticSet("train", 10, skills=("ocr", "counting"))
    assert [data[i].skill for i in range(4)] == ["ocr", "counting", "ocr", "counting"]


def test_colour_and_shape_answers_match_the_pixels():
    data = DiagnosticSet("train", 240, seed=5)
    for i in range(0, 240, len(IMAGE_SKILLS)):
        s = data[i]
        assert s.skill == "colour"
        assert dominant_colour(s.images[0]) == COLOURS[s.answer]
        shape = data[i + 1]
        name, _, _, _, side = data.key(i + 1)[1]
        assert shape.answer == name in SHAPES
        # Fill ratio of the bounding box tells the three shapes apart: 1, pi/4, about 1/2.
        ink = np.any(np.asarray(shape.images[0]) != BACKGROUND, axis=-1).sum() / side**2
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[name]
        assert abs(ink - expected) < 0.12


def test_counting_answer_is_the_number_of_blobs():
    data = DiagnosticSet("test", 6 * 80, seed=2, skills=IMAGE_SKILLS)
    counts = Counter()
    for i in range(IMAGE_SKILLS.index("counting"), len(data), len(IMAGE_SKILLS)):
        s = data[i]
        assert components(s.images[0]) == int(s.answer)
        counts[s.answer] += 1
    assert set(counts) == set(answer_set("counting"))


def test_spatial_answer_matches_the_shape_centres():
    data = DiagnosticSet("train", 6 * 60, seed=1)
    relations = Counter()
    for i in range(IMAGE_SKILLS.index("spatial"), len(data), len(IMAGE_SKILLS)):
        s = data[i]
        _, relation, a, b = data.key(i)
        assert s.answer == relation and s.question == f"where is the {a[0]} relative to the {b[0]}?"
        assert a[0] != b[0]
        ca = np.array([a[2] + a[4] / 2, a[3] + a[4] / 2])  # (x, y) centres
        cb = np.array([b[2] + b[4] / 2, b[3] + b[4] / 2])
        dx, dy = ca - cb
        truth = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert truth == relation
        relations[relation] += 1
    assert set(relations) == set(answer_set("spatial"))


def test_ocr_strings():
    data = DiagnosticSet("train", 6 * 40, seed=0)
    for i in range(IMAGE_SKILLS.index("ocr"), len(data), len(IMAGE_SKILLS)):
        s = data[i]
        assert len(s.answer) == OCR_LENGTH and set(s.answer.upper()) <= set(OCR_ALPHABET)
        ink = np.any(np.asarray(s.images[0]) != BACKGROUND, axis=-1)  # (H, W)
        assert ink.sum() > 60 and not ink[0].any() and not ink[:, 0].any()  # drawn, inside the frame


def test_compare_is_balanced_and_true():
    data = DiagnosticSet("train", 6 * 200, seed=0)
    answers = Counter()
    for i in range(IMAGE_SKILLS.index("compare"), len(data), len(IMAGE_SKILLS)):
        s = data[i]
        a, b = (dominant_colour(img) for img in s.images)
        if "colour" in s.question:
            assert s.answer == ("yes" if a == b else "no")
        answers[(s.question, s.answer)] += 1
    assert set(answers.values()) == {50}  # colour/shape x yes/no, 200 samples


def test_chance_levels():
    assert chance_level("colour") == pytest.approx(1 / 6)
    assert chance_level("shape") == pytest.approx(1 / 3)
    assert chance_level("spatial") == pytest.approx(1 / 4)
    assert chance_level("counting") == pytest.approx(1 / 6)
    assert chance_level("ocr") == pytest.approx(1 / 8**2)
    assert chance_level("compare") == pytest.approx(1 / 2)
    assert len(set(answer_set("ocr"))) == 64


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="split"):
        DiagnosticSet("dev", 10)
    with pytest.raises(ValueError, match="unknown skill"):
        DiagnosticSet("train", 10, skills=("colour", "texture"))
    with pytest.raises(ValueError, match="image_size"):
        DiagnosticSet("train", 10, image_size=16)
    with pytest.raises(ValueError, match="unknown skill"):
        chance_level("texture")
    data = DiagnosticSet("train", 5)
    assert len(data) == 5
    with pytest.raises(IndexError):
        data[5]
    assert len(list(data)) == 5


def test_skill_weights_give_a_skill_more_training_samples():
    data = DiagnosticSet("train", 700, seed=0, weights={"ocr": 2})
    counts = {s: 0 for s in IMAGE_SKILLS}
    for i in range(len(data)):
        counts[data.key(i)[0]] += 1
    assert counts["ocr"] == 200 and all(counts[s] == 100 for s in IMAGE_SKILLS if s != "ocr")
    answers = [data[i].answer for i in range(len(data)) if data.key(i)[0] == "compare"]
    assert answers.count("yes") == answers.count("no")  # compare stays balanced
    with pytest.raises(ValueError, match="not among the skills"):
        DiagnosticSet("train", 10, skills=("colour",), weights={"ocr": 2})
    with pytest.raises(ValueError, match="positive integer"):
        DiagnosticSet("train", 10, weights={"ocr": 0})


def test_skill_weights_apply_to_training_only(tmp_path):
    from omnifuse.training.config import TrainConfig
    from omnifuse.training.sources import DiagnosticSource

    cfg = TrainConfig(skill_weights={"ocr": 3}, out_dir=str(tmp_path))
    train, test = DiagnosticSource("train", 80, cfg), DiagnosticSource("test", 60, cfg)
    assert sum(train[i][2]["skill"] == "ocr" for i in range(80)) == 30
    assert sum(test[i][2]["skill"] == "ocr" for i in range(60)) == 10
