"""Prompt layout: where media placeholders go in a prompt, and the token ids the prompt becomes.

One set of rules for every place that builds a prompt, so that training and inference build the
same one: the pipeline (``omnifuse generate``), training collation (``training/collate.py``), the
LLaVA-format reader's checks (``training/llava_data.py``) and ``plan --measure``.

- A prompt without placeholders gets one per image in front: ``<image>\\ntext`` (LLaVA's
  convention) or ``<|image|>text`` (Mllama's processor puts nothing between). A prompt with
  placeholders must have one per image; anything else is a ``FeatureCountError`` naming both
  counts. A conversation counts its user turns and gets the images in front of its first one.
- Mllama's bos rule (``text.bos_after_leading_images``; transformers' ``build_string_from_input``):
  a plain prompt without the bos string gets it after its leading image tokens, and the tokenizer's
  own bos goes first as well, ``<bos><|image|><bos>text``, as the reference runs the model. A chat
  template renders its own bos, so a chat prompt is tokenized as rendered (bos never doubled).
- The fusion strategy decides how many positions a placeholder takes (``Fusion.placeholder_tokens``):
  early fusion one per media token (the model writes the features over them), cross-attention one
  per image.
- A text-only model takes the prompt as text: ``<image>`` there is ordinary text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omnifuse.config import ModelConfig, TextConfig
from omnifuse.fusion.early import FeatureCountError
from omnifuse.fusion.strategy import Fusion, fusion_strategy
from omnifuse.processing.text import Tokenizer

__all__ = ["FeatureCountError", "PromptLayout", "media_count_error"]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def media_count_error(placeholders: int, images: int, where: str = "the prompt",
                      token: str | None = None) -> FeatureCountError:
    """The one message for "placeholders and media disagree", with both counts."""
    mark = f" ({token})" if token else ""
    return FeatureCountError(f"{where} has {_plural(placeholders, 'image placeholder')}{mark} but "
                             f"{_plural(images, 'image')} {'was' if images == 1 else 'were'} given")


def _positions(ids: list[int], placeholder_id: int, token_counts: Sequence[int],
               placeholder_tokens: Callable[[int], int]) -> list[int]:
    """Prompt positions each id takes: image i's placeholder ``placeholder_tokens(token_counts[i])``
    (the fusion's rule), any other id one."""
    n = ids.count(placeholder_id)
    if n != len(token_counts):
        raise media_count_error(n, len(token_counts))
    if any(c < 1 for c in token_counts):
        raise FeatureCountError(f"every image needs at least one token, got counts {list(token_counts)}")
    counts = iter(token_counts)
    return [placeholder_tokens(next(counts)) if i == placeholder_id else 1 for i in ids]


def _repeat(values: Sequence, repeats: Sequence[int]) -> list:
    return [v for v, r in zip(values, repeats) for _ in range(r)]


class PromptLayout:
    """The prompt rules of one model and tokenizer (``PromptLayout.for_model(config, tokenizer)``).

    ``token_counts`` arguments are the images' token counts, in prompt order (``ProcessedImage.
    num_tokens``): their number is the number of images, and early fusion expands by them.
    """

    def __init__(self, tokenizer: Tokenizer, text: TextConfig, fusion: Fusion, has_media: bool = True,
                 model_name: str = "this model") -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.image_token = text.image_token
        self.fusion = fusion  # the only thing asked of it: placeholder_tokens
        self.has_media = has_media
        self.model_name = model_name
        # Between leading images and the text of a prompt that had no placeholders: LLaVA's
        # "<image>\ntext"; Mllama's processor adds nothing ("<|image|>text").
        self.separator = "" if text.bos_after_leading_images else "\n"

    @classmethod
    def for_model(cls, config: ModelConfig, tokenizer: Tokenizer) -> PromptLayout:
        return cls(tokenizer, config.text, fusion_strategy(config.fusion), config.has_media, config.name)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.image_token_id

    # ------------------------------------------------------------------ placeholders in text
    def place_media(self, prompt: str, n_images: int) -> str:
        """``prompt`` with one placeholder per image: put in front when it has none, else checked."""
        return self._place([{"role": "user", "content": prompt}], n_images, "the prompt")[0]["content"]

    def place_media_in_messages(self, messages: Sequence[dict[str, Any]], n_images: int) -> list[dict[str, Any]]:
        """The same for a conversation (``[{"role": ..., "content": str}]``): placeholders are counted
        over the user turns; a conversation without any gets them in front of its first user turn."""
        return self._place(messages, n_images, "the conversation")

    def _place(self, messages: Sequence[dict[str, Any]], n_images: int, where: str) -> list[dict[str, Any]]:
        messages = list(messages)
        if not self.has_media:
            self._check_no_media(n_images)
            return messages
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        marks = sum(messages[i]["content"].count(self.image_token) for i in users)
        if marks == 0 and n_images and users:
            first = messages[users[0]]
            messages[users[0]] = {**first, "content": self.image_token * n_images + self.separator + first["content"]}
        elif marks != n_images:
            raise media_count_error(marks, n_images, where, self.image_token)
        return messages

    def _check_no_media(self, n_images: int) -> None:
        if n_images:
            raise FeatureCountError(f"{self.model_name} is a text-only model; it takes no images ({n_images} given)")

    # ------------------------------------------------------------------ ids
    def encode(self, prompt: str, token_counts: Sequence[int] = (), chat: bool = False) -> list[int]:
        """Token ids of ``prompt`` and its images: media placed, the chat template applied as one user
        turn when ``chat`` (else Mllama's bos rule where the tokenizer has it), placeholders expanded
        as the fusion needs."""
        prompt = self.place_media(prompt, len(token_counts))
        if chat:
            return self.encode_conversation([{"role": "user", "content": prompt}], token_counts)
        if not self.has_media:
            return self.tokenizer.encode(prompt)
        if self.text.bos_after_leading_images:
            ids = self._bos_after_leading_images(prompt)
        else:
            ids = self.tokenizer.encode(prompt)  # never doubles a bos the text already starts with
        return self.expand(ids, token_counts)

    def encode_conversation(self, messages: Sequence[dict[str, Any]], token_counts: Sequence[int] = ()) -> list[int]:
        """Ids for generating the next assistant turn: media placed, the chat template rendered with
        the generation prompt, tokenized as :meth:`tokenize` does a first piece, expanded."""
        messages = self.place_media_in_messages(messages, len(token_counts))
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.expand(self.tokenize(rendered), token_counts)

    def tokenize(self, rendered: str, first: bool = True) -> list[int]:
        """Ids of rendered text (a chat template's output, or a piece of it): the first piece gets the
        tokenizer's bos unless it starts with one already, later pieces none."""
        return self.tokenizer.encode(rendered, add_bos=first)

    def _bos_after_leading_images(self, prompt: str) -> list[int]:
        # Mllama's processor (build_string_from_input): leading image tokens, then bos, then text.
        bos = self.text.bos_token
        if bos not in prompt:
            rest, n_lead = prompt, 0
            while rest.startswith(self.image_token):
                rest, n_lead = rest[len(self.image_token):], n_lead + 1
            prompt = self.image_token * n_lead + bos + rest
        # The reference then tokenizes with special tokens, so the tokenizer's bos comes first as
        # well: "<bos><|image|><bos>text". Reproduced, since the model was run that way.
        ids = self.tokenizer.encode(prompt, add_bos=False)
        if self.tokenizer.adds_bos:
            ids.insert(0, self.tokenizer.bos_token_id)
        return ids

    def context_positions(self, ids: Sequence[int], token_counts: Sequence[int]) -> list[int]:
        """How many prompt positions each of ``ids`` takes: an image's placeholder one per media token
        (early fusion) or one (cross-attention), any other id one. Raises ``FeatureCountError`` when
        the placeholders in ``ids`` and the images disagree."""
        ids = [int(i) for i in ids]
        if not self.has_media:
            self._check_no_media(len(token_counts))
            return [1] * len(ids)
        return _positions(ids, self.image_token_id, token_counts, self.fusion.placeholder_tokens)

    def expand(self, ids: Sequence[int], token_counts: Sequence[int]) -> list[int]:
        """``ids`` with each image placeholder repeated to the positions it takes in the context."""
        ids = [int(i) for i in ids]
        return _repeat(ids, self.context_positions(ids, token_counts))

    def media_span(self, token_counts: Sequence[int]) -> list[int]:
        """The ids a run of images takes in the context: one placeholder per media token (early
        fusion) or per image (cross-attention)."""
        return [self.image_token_id] * sum(self.fusion.placeholder_tokens(c) for c in token_counts)
