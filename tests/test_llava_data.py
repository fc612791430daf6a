"""LLaVA instruction data and caption pairs: good records parse, every bad one is reported by index."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from omnifuse.processing.image import ImageError
from omnifuse.processing.prompt import FeatureCountError
from omnifuse.training.llava_data import (
    Conversation,
    DataFormatError,
    read_caption_pairs,
    read_llava_json,
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.new("RGB", (12, 10), (200, 30, 30)).save(images / name)
    (images / "empty.png").write_bytes(b"")
    return images


def write(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


GOOD = [
    {"id": "multi-turn", "image": "a.png",
     "conversations": turns(("human", "<image>\nWhat colour?"), ("gpt", "Red."),
                            ("human", "Sure?"), ("gpt", "Yes."))},
    {"id": 7, "conversations": turns(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."))},
    {"image": ["a.png", "sub/c.png"],
     "conversations": turns(("human", "<image> and <image>: same?"), ("gpt", "Yes."))},
]


def test_good_records_parse(tmp_path, folder):
    convs, warnings = read_llava_json(write(tmp_path, GOOD), folder)
    assert warnings == []
    first, text_only, multi = convs
    assert first.images == (str(folder / "a.png"),)
    assert first.turns == (("user", "<image>\nWhat colour?"), ("assistant", "Red."),
                           ("user", "Sure?"), ("assistant", "Yes."))
    assert (first.index, first.id) == (0, "multi-turn")
    assert text_only.images == () and text_only.turns[0] == ("system", "Be brief.") and text_only.id == "7"
    assert multi.images == (str(folder / "a.png"), str(folder / "sub" / "c.png")) and multi.index == 2


def test_missing_placeholder_is_left_to_the_prompt_layout(tmp_path, folder):
    records = [{"image": "a.png", "conversations": turns(("human", "Describe it."), ("gpt", "A red box."))},
               {"image": ["a.png", "b.png"],
                "conversations": turns(("system", "S"), ("human", "Same?"), ("gpt", "Yes."))}]
    (one, two), warnings = read_llava_json(write(tmp_path, records), folder)
    assert warnings == []
    assert one.turns[0] == ("user", "Describe it.")  # as in the file: the layout places the images
    assert two.turns[:2] == (("system", "S"), ("user", "Same?"))
    # ... in front of the first human turn, as `omnifuse generate` does: LLaVA's "<image>\n".
    from omnifuse.config import ModelConfig
    from omnifuse.processing.prompt import PromptLayout
    from omnifuse.processing.text import ByteTokenizer

    layout = PromptLayout.for_model(ModelConfig(), ByteTokenizer())
    messages = [{"role": r, "content": t} for r, t in two.turns]
    assert layout.place_media_in_messages(messages, len(two.images))[1]["content"] == "<image><image>\nSame?"
    assert layout.place_media("Same?", 2) == "<image><image>\nSame?"


def test_placeholder_count_mismatch_is_a_feature_count_error_with_both_counts(tmp_path, folder):
    record = {"image": "a.png", "conversations": turns(("human", "<image> vs <image>"), ("gpt", "b"))}
    path = write(tmp_path, [GOOD[0], record])
    _, warnings = read_llava_json(path, folder, on_error="skip")
    assert warnings == ["record 1: the conversation has 2 image placeholders (<image>) but 1 image was given"]
    with pytest.raises(FeatureCountError) as err:
        read_llava_json(path, folder, on_error="raise")
    assert str(err.value) == f"{path}: {warnings[0]}"


BAD = {
    "not a dict": (["a.png"], "must be an object"),
    "no conversations": ({"image": "a.png"}, "no 'conversations'"),
    "empty conversations": ({"conversations": []}, "non-empty list"),
    "wrong role order": ({"conversations": turns(("gpt", "Hi"), ("human", "Hello"))},
                         "turn 0 is from 'gpt' where 'human' was expected"),
    "two humans": ({"conversations": turns(("human", "a"), ("human", "b"), ("gpt", "c"))}, "alternate"),
    "ends with human": ({"conversations": turns(("human", "a"), ("gpt", "b"), ("human", "c"))}, "end with a gpt"),
    "unknown role": ({"conversations": turns(("bot", "a"), ("gpt", "b"))}, "'bot'"),
    "placeholder count": ({"image": "a.png", "conversations": turns(("human", "<image><image>"), ("gpt", "b"))},
                          "2 image placeholders (<image>) but 1 image was given"),
    "placeholder without image": ({"conversations": turns(("human", "<image>\nx"), ("gpt", "b"))},
                                  "1 image placeholder (<image>) but 0 images were given"),
    "placeholder in answer": ({"image": "a.png", "conversations": turns(("human", "<image>"), ("gpt", "<image>"))},
                              "gpt turn contains"),
    "missing image file": ({"image": "nope.png", "conversations": turns(("human", "<image>"), ("gpt", "b"))},
                           "image file not found"),
    "empty image file": ({"image": "empty.png", "conversations": turns(("human", "<image>"), ("gpt", "b"))},
                         "empty (0 bytes)"),
    "empty value": ({"conversations": turns(("human", "  "), ("gpt", "b"))}, "empty or non-string 'value'"),
    "non-string value": ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]},
                         "non-string"),
    "turn not a dict": ({"conversations": ["hi", {"from": "gpt", "value": "b"}]}, "turn 0 must be an object"),
    "empty image list": ({"image": [], "conversations": turns(("human", "a"), ("gpt", "b"))}, "empty list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_is_reported_by_index(tmp_path, folder, case):
    record, problem = BAD[case]
    path = write(tmp_path, [GOOD[0], GOOD[1], record, GOOD[2]])
    convs, warnings = read_llava_json(path, folder, on_error="skip")
    assert [c.index for c in convs] == [0, 1, 3]
    assert len(warnings) == 1 and warnings[0].startswith("record 2: ") and problem in warnings[0]
    count_case = case in ("placeholder count", "placeholder without image")
    with pytest.raises(FeatureCountError if count_case else DataFormatError, match="record 2: ") as err:
        read_llava_json(path, folder, on_error="raise")
    assert problem in str(err.value) and str(path) in str(err.value)


def test_check_images_off_skips_existence_but_not_format(tmp_path, folder):
    record = {"image": "nope.png", "conversations": turns(("human", "x"), ("gpt", "y"))}
    (conv,), warnings = read_llava_json(write(tmp_path, [record]), folder, check_images=False)
    assert warnings == [] and conv.images == (str(folder / "nope.png"),)
    from omnifuse.processing.image import load_image

    with pytest.raises(ImageError, match="not found"):  # found out when the row is built
        load_image(conv.images[0])


def test_image_folder_defaults_to_the_data_files_folder(tmp_path, folder):
    path = write(folder, [GOOD[0]])
    (conv,), _ = read_llava_json(path, None)
    assert conv.images == (str(folder / "a.png"),)


def test_file_level_errors_name_the_path(tmp_path, folder):
    with pytest.raises(DataFormatError, match="not found.*missing.json"):
        read_llava_json(tmp_path / "missing.json", folder)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{")
    with pytest.raises(DataFormatError, match="bad.json is not valid JSON"):
        read_llava_json(bad_json, folder)
    with pytest.raises(DataFormatError, match="must hold a JSON list"):
        read_llava_json(write(tmp_path, {"conversations": []}), folder)
    with pytest.raises(DataFormatError, match="none of its 2 records is usable; first problem: record 0"):
        read_llava_json(write(tmp_path, [GOOD[0], GOOD[2]]), tmp_path / "wrong-folder")
    with pytest.raises(ValueError, match="on_error"):
        read_llava_json(write(tmp_path, GOOD), folder, on_error="ignore")
    assert read_llava_json(write(tmp_path, []), folder) == ([], [])


def test_caption_pairs_json_and_jsonl(tmp_path, folder):
    records = [{"image": "a.png", "caption": " A red box. "},
               {"image": "b.png", "caption": ""},
               {"image": "nope.png", "caption": "x"},
               {"id": "558k", "image": "sub/c.png",
                "conversations": turns(("human", "<image>\nDescribe."), ("gpt", "Red again."))}]
    expected = [(str(folder / "a.png"), "A red box."), (str(folder / "sub" / "c.png"), "Red again.")]
    for name in ("pairs.json", "pairs.jsonl"):
        pairs, warnings = read_caption_pairs(write(tmp_path, records, name), folder)
        assert pairs == expected
        assert [w.split(":")[0] for w in warnings] == ["record 1", "record 2"]
        assert "caption must be a non-empty string" in warnings[0] and "image file not found" in warnings[1]
    with pytest.raises(DataFormatError, match="record 1: caption"):
        read_caption_pairs(write(tmp_path, records, "pairs.jsonl"), folder, on_error="raise")


def test_jsonl_bad_line_is_one_bad_record(tmp_path, folder):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": \n{"image": "b.png", "caption": "ok"}\n')
    pairs, warnings = read_caption_pairs(path, folder)
    assert len(pairs) == 2
    assert len(warnings) == 1 and warnings[0].startswith("record 1: line 3 is not valid JSON")
    with pytest.raises(DataFormatError, match="data file not found: .*nope.jsonl"):
        read_caption_pairs(tmp_path / "nope.jsonl", folder)


def test_conversation_is_frozen():
    conv = Conversation(images=(), turns=(("user", "a"), ("assistant", "b")), index=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.index = 1  # type: ignore[misc]


def test_llava_image_marks_become_the_models_placeholder(tmp_path, folder):
    """Fine-tuning Llama 3.2 Vision on LLaVA data: "<image>" in the file is the model's "<|image|>",
    so the image stays where the file puts it instead of being read as text."""
    from types import SimpleNamespace

    from omnifuse.training.sources import LlavaSource

    settings = SimpleNamespace(image_folder=str(folder), on_error="raise")
    path = write(tmp_path, GOOD)
    source = LlavaSource(str(path), settings, placeholder_tokens={"image": "<|image|>"})
    turns, images, _ = source[0]
    assert len(images) == 1
    assert turns[:2] == [("user", "<|image|>\nWhat colour?"), ("assistant", "Red.")]
    assert source[2][0][0] == ("user", "<|image|> and <|image|>: same?") and len(source[2][1]) == 2
    assert LlavaSource(str(path), settings)[0][0][0] == ("user", "<image>\nWhat colour?")
