"""Turning conversations into training rows: chat template, loss mask, media placeholders, padding.

Only assistant tokens carry a loss. Each assistant turn's tokens are found by rendering the chat
template up to the turn (with the generation prompt) and through it: the difference is the
answer. Media placeholders follow the prompt layout of processing/prompt.py, the pipeline's own
(early fusion: each expanded to the image's token count, no loss there).
A row longer than ``max_length`` is cut at the end, unless the cut would split or drop a media
span or leave no answer: then the row is dropped (counted) or rejected, as configured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnifuse.errors import ConfigError, TokenizerError, TruncationError
from omnifuse.processing.image import ProcessedImage
from omnifuse.processing.prompt import PromptLayout
from omnifuse.training.losses import IGNORE

__all__ = ["Example", "ExampleBuilder", "TruncationError", "collate", "length_groups"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[ProcessedImage]  # the row's media items (any modality), in prompt order
    meta: dict = field(default_factory=dict)  # e.g. {"skill": "colour", "answer": "red"}


_POSSESSIVE = {"image": "an image's", "audio": "an audio clip's", "video": "a video's"}


def by_modality(media) -> dict[str, list]:
    """A record's media as {modality: items}: a plain list means images."""
    if isinstance(media, dict):
        return {m: list(v) for m, v in media.items() if v}
    return {"image": list(media)} if media else {}


class ExampleBuilder:
    """Training rows from conversations, laid out by ``layout`` (processing/prompt.py) exactly as the
    pipeline lays out a chat prompt: a user turn gives the ids ``Pipeline.prompt_ids(..., chat=True)``
    gives for the same text and images."""

    def __init__(self, layout: PromptLayout, max_length: int, truncation: str = "drop") -> None:
        if truncation not in ("drop", "error"):
            raise ConfigError(f"truncation must be drop or error, got {truncation!r}")
        self.layout, self.tokenizer = layout, layout.tokenizer
        self.max_length, self.truncation = max_length, truncation
        self.dropped = 0  # rows dropped by truncation
        self.last_drop = ""  # why the latest one was

    def _messages(self, turns, counts: dict[str, int]) -> list[dict]:
        return self.layout.place_media_in_messages([{"role": role, "content": text} for role, text in turns], counts)

    def _segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, is_answer) pieces whose concatenation is the rendered conversation."""
        render = self.tokenizer.apply_chat_template
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, full = render(messages[:i], add_generation_prompt=True), render(messages[:i + 1], add_generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise TokenizerError("the chat template does not render conversations as growing prefixes; "
                                     "assistant tokens cannot be located")
            pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        return [(t, a) for t, a in pieces if t]

    def build(self, turns, media, meta: dict | None = None) -> Example | None:
        """One training row, or None when truncation dropped it (``dropped`` counts these).
        ``media``: the record's processed items, {modality: items} or a list of images."""
        media = by_modality(media)
        ids: list[int] = []
        labels: list[int] = []
        for text, is_answer in self._segments(self._messages(turns, {m: len(v) for m, v in media.items()})):
            piece = self.layout.tokenize(text, first=not ids)
            ids += piece
            labels += piece if is_answer else [IGNORE] * len(piece)
        order = self.layout.media_order(ids)
        spans = self.layout.spans(ids, media)
        # A media span (its tokens and any markers) carries no loss; a cross-attention placeholder
        # is one position and keeps its label.
        labels = [lab if len(span) == 1 else IGNORE for lab, span in zip(labels, spans) for _ in span]
        ids = [tok for span in spans for tok in span]
        if len(ids) > self.max_length:
            of = self.layout.placeholder_ids() if media else {}
            cut = next((of[t] for t in ids[self.max_length:] if t in of), None)
            no_answer = all(lab == IGNORE for lab in labels[:self.max_length])
            if cut or no_answer:
                why = f"would cut {_POSSESSIVE.get(cut, 'a media item' + chr(39) + 's')} tokens" if cut \
                    else "would remove every answer token"
                message = f"a row of {len(ids)} tokens exceeds max_length {self.max_length} and truncating it {why}"
                if self.truncation == "error":
                    raise TruncationError(message)
                self.dropped += 1
                self.last_drop = message
                return None
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        return Example(ids, labels, [media[m][k] for m, k in order], dict(meta or {}))

    def prompt(self, turns, media) -> list[int]:
        """Ids for generation: the conversation so far plus the assistant prompt (eval uses this)."""
        return self.prompt_and_media(turns, media)[0]

    def prompt_and_media(self, turns, media) -> tuple[list[int], list]:
        """(``prompt``'s ids, the media items in prompt order, as the model takes them)."""
        media = by_modality(media)
        ids, order = self.layout.encode_conversation_with_order(
            [{"role": role, "content": text} for role, text in turns], media)
        return ids, [media[m][k] for m, k in order]


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded batch: input_ids, labels, attention_mask (B, T) and images (list per row)."""
    t = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "images": [e.images for e in examples]}


# A forward pass costs about this many padded tokens more per extra micro-batch (per-op overhead).
_GROUP_OVERHEAD_TOKENS = 256


def length_groups(examples: list[Example], max_groups: int = 3) -> list[list[Example]]:
    """Split a micro-batch into groups of similar length, so that short rows are not padded to
    the longest one (a row with two images can be half again as long as the rest). The loss is
    summed over answer tokens and divided by the step's token count, so any split of a step's rows
    gives the same gradient: this changes speed, not the objective. Groups are contiguous runs of
    the rows sorted by length, chosen to minimise padded tokens plus a per-group overhead."""
    if len(examples) <= 1:
        return [examples] if examples else []
    rows = sorted(examples, key=lambda e: len(e.input_ids))
    lengths = [len(e.input_ids) for e in rows]
    n = len(rows)
    # best[g][j]: (cost, cut points) of the first j rows in g groups; a group i..j-1 costs
    # (j - i) * lengths[j - 1] padded tokens (rows are sorted, so its last row is its longest).
    best = [[(0, ())] + [(float("inf"), ())] * n]
    for g in range(1, max_groups + 1):
        row = [(float("inf"), ())] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):
                prev, cuts = best[g - 1][i]
                cost = prev + (j - i) * lengths[j - 1] + _GROUP_OVERHEAD_TOKENS
                if cost < row[j][0]:
                    row[j] = (cost, cuts + (j,))
        best.append(row)
    _, cuts = min((best[g][n] for g in range(1, max_groups + 1)), key=lambda c: c[0])
    return [rows[a:b] for a, b in zip((0, *cuts[:-1]), cuts)]
