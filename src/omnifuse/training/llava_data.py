"""LLaVA-format instruction data and image-caption pairs, read and checked record by record.

Instruction data is LLaVA's JSON list::

    [{"id": "000123", "image": "coco/train2017/000000123.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                        {"from": "gpt", "value": "A bowl of fruit."}]}]

``"image"`` may also be a list of paths (multi-image records) or absent (text-only records).
Caption pairs for connector alignment are ``{"image": ..., "caption": ...}`` objects, as a JSON list
or as JSON Lines (``.jsonl``); LLaVA's own pretraining records (one human prompt, one gpt caption)
are read as pairs too.

Every record is checked when the file is read, not when a batch first meets it hours into a run. A
bad record is never dropped silently: with ``on_error="skip"`` it is left out and a message
``"record 17: <problem>"`` goes into the returned warnings; with ``on_error="raise"`` that message
is a ``DataFormatError``, or the ``FeatureCountError`` every prompt builder raises when placeholders
and images disagree (processing/prompt.py). A file in which every record is bad raises either way:
that is a wrong ``image_folder`` or a wrong file far more often than bad data.

A record with images but no ``<image>`` in its text is kept as it is: the prompt layout puts the
images in front of the first human turn when the row is built, as it does for ``omnifuse generate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnifuse.errors import ConfigError, DataFormatError
from omnifuse.processing.prompt import FeatureCountError, media_count_error

__all__ = [
    "IMAGE_TOKEN",
    "Conversation",
    "DataFormatError",
    "read_caption_pairs",
    "read_llava_json",
]

IMAGE_TOKEN = "<image>"  # LLaVA's placeholder; the prompt layout expands it to visual tokens
# Each media field of a record and its mark in the text ("audio" and "video" extend LLaVA's format).
MEDIA_FIELDS = {"image": ("image", IMAGE_TOKEN), "audio": ("audio", "<audio>"), "video": ("video", "<video>")}
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_LABELS = {role: label for label, role in _ROLES.items()}  # messages use the file's own words
_ON_ERROR = ("skip", "raise")

PathLike = str | Path


@dataclass(frozen=True)
class Conversation:
    images: tuple[str, ...]  # image paths resolved against the image folder; empty if text-only
    turns: tuple[tuple[str, str], ...]  # (role, text): an optional "system" first, then
    # alternating "user" / "assistant", ending with "assistant"; "<image>" stays where the file has
    # it (none: the prompt layout puts the images in front of the first user turn)
    index: int  # record index in the file (0-based)
    id: str | None = None  # the record's "id", if it had one
    audio: tuple[str, ...] = ()  # audio paths (the record's "audio"), resolved the same way
    video: tuple[str, ...] = ()  # video paths (the record's "video")

    @property
    def media(self) -> dict[str, tuple[str, ...]]:
        return {m: v for m, v in (("image", self.images), ("audio", self.audio), ("video", self.video)) if v}


class _BadRecord(Exception):
    """One record's problem; becomes a warning or an ``error`` (DataFormatError unless the problem
    has its own type) with the record index."""

    def __init__(self, message: str, error: type[ValueError] = DataFormatError) -> None:
        super().__init__(message)
        self.error = error


# ---------------------------------------------------------------------------------------------
# Files


def _load_records(path: PathLike) -> list[tuple[Any, str | None]]:
    """(record, problem) pairs: a JSON list, or JSON Lines when the suffix is .jsonl, where a line
    that is not JSON is one bad record rather than a bad file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read data file {path}: {e}") from None
    if path.suffix.lower() == ".jsonl":
        records: list[tuple[Any, str | None]] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), None))
            except json.JSONDecodeError as e:
                records.append((None, f"line {line_no} is not valid JSON: {e.msg} (column {e.colno})"))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path} must hold a JSON list of records, got a JSON {type(data).__name__}")
    return [(record, None) for record in data]


def _image_root(path: PathLike, image_folder: PathLike | None) -> Path:
    # Without a folder, relative image paths are taken relative to the data file, not the cwd, so
    # the result does not depend on where the program was started.
    return Path(image_folder) if image_folder not in (None, "") else Path(path).parent


def _resolve_image(value: Any, root: Path, check: bool, kind: str = "image") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadRecord(f"{kind} path must be a non-empty string, got {value!r}")
    resolved = root / value  # an absolute `value` replaces `root`
    if check:
        # Existence and size only: decoding hundreds of thousands of files here would take longer
        # than the first epoch; a corrupt file surfaces (ImageError, AudioError, VideoError) when loaded.
        if not resolved.is_file():
            raise _BadRecord(f"{kind} file not found: {resolved}")
        if resolved.stat().st_size == 0:
            raise _BadRecord(f"{kind} file is empty (0 bytes): {resolved}")
    return str(resolved)


def _record_id(record: Any) -> str | None:
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and not isinstance(record["id"], bool):
        return str(record["id"])
    return None


def _read(path: PathLike, on_error: str, parse) -> tuple[list, list[str]]:
    """Run ``parse(record)`` over every record under the error policy."""
    if on_error not in _ON_ERROR:
        raise ConfigError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    records = _load_records(path)
    good, warnings = [], []
    for index, (record, problem) in enumerate(records):
        try:
            if problem is not None:
                raise _BadRecord(problem)
            good.append(parse(record, index))
        except _BadRecord as e:
            rid = _record_id(record)
            message = f"record {index}: {e}" + (f" (id {rid!r})" if rid is not None else "")
            if on_error == "raise":
                raise e.error(f"{path}: {message}") from None
            warnings.append(message)
    if records and not good:
        raise DataFormatError(f"{path}: none of its {len(records)} records is usable; "
                              f"first problem: {warnings[0]}")
    return good, warnings


# ---------------------------------------------------------------------------------------------
# Instruction data


def _parse_turns(conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise _BadRecord(f"'conversations' must be a non-empty list, got {conversations!r:.60}")
    turns = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _BadRecord(f"turn {t} must be an object, got {type(turn).__name__}")
        source, value = turn.get("from"), turn.get("value")
        if source not in _ROLES:
            raise _BadRecord(f"turn {t} has 'from' = {source!r}; expected one of {tuple(_ROLES)}")
        if not isinstance(value, str) or not value.strip():
            raise _BadRecord(f"turn {t} ({source}) has an empty or non-string 'value': {value!r:.60}")
        turns.append((_ROLES[source], value))

    start = 1 if turns[0][0] == "system" else 0
    body = turns[start:]
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    for t, (role, _) in enumerate(body):
        if role != expected[t]:
            raise _BadRecord(f"turn {t + start} is from {_LABELS[role]!r} where {_LABELS[expected[t]]!r} "
                             f"was expected: turns must alternate human, gpt, ... (an optional system turn first)")
    if not body or body[-1][0] != "assistant":
        # A trailing question has no answer to learn from; LLaVA's data always ends with gpt.
        last = _LABELS[body[-1][0]] if body else "system"
        raise _BadRecord(f"the conversation must end with a gpt turn, but its last turn is {last!r}")
    return turns


def _parse_images(record: dict, root: Path, check: bool, field: str = "image") -> list[str]:
    value = record.get(field)
    if value is None:
        return []
    paths = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise _BadRecord(f"'{field}' is an empty list; leave it out for a record without {field}")
    return [_resolve_image(p, root, check, field) for p in paths]


def _parse_conversation(record: Any, index: int, root: Path, check: bool) -> Conversation:
    if not isinstance(record, dict):
        raise _BadRecord(f"must be an object, got {type(record).__name__}")
    if "conversations" not in record:
        raise _BadRecord("has no 'conversations'")
    turns = _parse_turns(record["conversations"])
    media = {}
    for modality, (field, mark) in MEDIA_FIELDS.items():
        items = _parse_images(record, root, check, field)
        for role, text in turns:
            if role != "user" and mark in text:
                raise _BadRecord(f"a {_LABELS[role]} turn contains {mark!r}; media belong in human turns")
        placed = sum(text.count(mark) for role, text in turns if role == "user")
        if placed != len(items) and not (placed == 0 and items):  # none placed: the layout places them
            raise _BadRecord(str(media_count_error(placed, len(items), "the conversation", mark, modality)),
                             FeatureCountError)
        media[modality] = tuple(items)
    return Conversation(images=media["image"], turns=tuple(turns), index=index, id=_record_id(record),
                        audio=media["audio"], video=media["video"])


def read_llava_json(path: PathLike, image_folder: PathLike | None, on_error: str = "skip",
                    check_images: bool = True) -> tuple[list[Conversation], list[str]]:
    """Read LLaVA instruction data: (conversations, warnings about skipped records).

    ``image_folder`` is what relative image paths are resolved against (the data file's folder when
    None or ""). ``on_error`` is ``"skip"`` (bad records become warnings) or ``"raise"``.
    """
    root = _image_root(path, image_folder)
    return _read(path, on_error, lambda record, index: _parse_conversation(record, index, root, check_images))


# ---------------------------------------------------------------------------------------------
# Caption pairs


def _parse_caption(record: Any, root: Path, check: bool) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise _BadRecord(f"must be an object, got {type(record).__name__}")
    if "caption" in record:
        caption = record["caption"]
    elif "conversations" in record:
        # LLaVA's pretraining set (blip_laion_cc_sbu_558k) stores each caption as the gpt answer to
        # a fixed "describe the image" prompt; the caption is that answer.
        turns = _parse_turns(record["conversations"])
        if len(turns) != 2 or turns[0][0] != "user":
            raise _BadRecord(f"a caption record in conversation form needs exactly one human and one "
                             f"gpt turn, got {len(turns)} turns")
        caption = turns[1][1].replace(IMAGE_TOKEN, "")
    else:
        raise _BadRecord("has neither 'caption' nor 'conversations'")
    if not isinstance(caption, str) or not caption.strip():
        raise _BadRecord(f"caption must be a non-empty string, got {caption!r:.60}")
    if "image" not in record or isinstance(record["image"], list):
        raise _BadRecord(f"needs one 'image' path, got {record.get('image')!r:.60}")
    return _resolve_image(record["image"], root, check), caption.strip()


def read_caption_pairs(path: PathLike, image_folder: PathLike | None, on_error: str = "skip",
                       check_images: bool = True) -> tuple[list[tuple[str, str]], list[str]]:
    """Read image-caption pairs: ((image path, caption) list, warnings about skipped records).

    Records are ``{"image": path, "caption": text}`` (a JSON list, or one object per line in a
    ``.jsonl`` file) or LLaVA pretraining conversations; errors follow ``read_llava_json``.
    """
    root = _image_root(path, image_folder)
    return _read(path, on_error, lambda record, index: _parse_caption(record, root, check_images))
