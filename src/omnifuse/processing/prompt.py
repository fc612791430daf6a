"""Prompt layout: where media placeholders go in a prompt, and the token ids the prompt becomes.

One set of rules for every place that builds a prompt, so that training and inference build the
same one: the pipeline (``omnifuse generate``), training collation (``training/collate.py``), the
LLaVA-format reader's checks (``training/llava_data.py``) and ``plan --measure``.

- Each modality has its placeholder (``text.placeholder_tokens``: ``<image>``, ``<audio>``, ...);
  the k-th placeholder of a modality stands for its k-th item, and the items reach the model in
  prompt order (``encode_with_order``). A modality whose placeholders the prompt lacks gets one per
  item in front, images first: ``<image>\\ntext`` (LLaVA's convention) or ``<|image|>text`` (Mllama's
  processor and Idefics3's chat template put nothing between). A prompt with placeholders of a modality must have one per item
  of it; anything else is a ``FeatureCountError`` naming both counts. A conversation counts its
  user turns and gets the media in front of its first one.
- Mllama's bos rule (``text.bos_after_leading_images``; transformers' ``build_string_from_input``):
  a plain prompt without the bos string gets it after its leading image tokens, and the tokenizer's
  own bos goes first as well, ``<bos><|image|><bos>text``, as the reference runs the model. A chat
  template renders its own bos, so a chat prompt is tokenized as rendered (bos never doubled).
- The fusion strategy decides how many positions a placeholder takes (``Fusion.placeholder_tokens``):
  early fusion one per media token (the model writes the features over them), cross-attention one
  per image.
- Each placeholder becomes its item's *span*: the ids it takes in the context. Plainly that is the
  placeholder repeated; a checkpoint whose processor frames crops with marker tokens names the
  rule in ``text.image_span`` (``idefics3``: ``<fake_token_around_image><row_r_col_c>`` before each
  tile's run, a newline after each row of tiles, then ``\n<fake_token_around_image><global-img>``,
  the whole image's run and ``<fake_token_around_image>``; a one-crop image only the last part).
  Marker text is tokenized as the reference tokenizes it inside the expanded prompt: between
  placeholder tokens, which are special, so no text around them merges with it.
- IDEFICS's rule (``text.image_span: idefics``, for its cross-attention placeholders): the text
  around each ``<image>`` loses its surrounding spaces and each image is framed by
  ``<fake_token_around_image>``, one shared between adjacent images
  (``<fake><image><fake><image><fake>``), as ``IdeficsProcessor`` joins a list of texts and images.
- BLIP-2's rule (``text.images_before_bos``): the leading image tokens go in front of the
  tokenizer's bos, ``<image>...<s>text``, as its processor prepends them to the tokenized text.
- A text-only model takes the prompt as text: ``<image>`` there is ordinary text.

Media are given per modality, ``{"image": [each image], "audio": [...]}``, each item as its token
count, a :class:`MediaShape`, or a processed item (anything with ``num_tokens``, and ``tiles`` for a
tiled image); a plain list means images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from omnifuse.config import ModelConfig, TextConfig
from omnifuse.fusion.early import FeatureCountError
from omnifuse.fusion.strategy import Fusion, fusion_strategy
from omnifuse.processing.text import Tokenizer

__all__ = ["IMAGE_SPANS", "FeatureCountError", "MediaShape", "PromptLayout", "media_count_error", "span_marker_tokens"]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


_ITEM_NOUN = {"image": "image", "audio": "audio clip", "video": "video"}


@dataclass(frozen=True)
class MediaShape:
    """What the prompt needs to know of one media item: its token count and, for a tiled image, its
    tile canvas (``ProcessedImage.tiles``: (rows, cols); (1, 1) for one crop)."""

    tokens: int
    tiles: tuple[int, int] = (1, 1)


MediaCounts = Mapping[str, Sequence]  # modality -> its items in order (counts, MediaShapes or processed items)
FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>"


def _tile_crops(shape: MediaShape) -> tuple[int, int]:
    """(crops, tokens per crop) of a tiled image whose canvas of several tiles adds a whole-image
    crop (Idefics3, Llama 4); an image of one tile is one crop."""
    rows, cols = shape.tiles
    crops = rows * cols + 1 if rows * cols > 1 else 1
    if shape.tokens % crops:
        raise FeatureCountError(f"an image of {crops} crops cannot have {shape.tokens} tokens "
                                "(the same number per crop)")
    return crops, shape.tokens // crops


def _idefics3_span(shape: MediaShape) -> list[str | int]:
    """Idefics3 / SmolVLM's expanded image: text pieces and runs of media tokens, in order
    (transformers' ``get_image_prompt_string``; a one-crop image is its ``rows == cols == 0`` case)."""
    rows, cols = shape.tiles
    crops, per_crop = _tile_crops(shape)
    pieces: list[str | int] = []
    text = ""
    if crops > 1:
        for r in range(rows):
            for c in range(cols):
                pieces += [text + f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>", per_crop]
                text = ""
            text += "\n"
        text += "\n"
    return [*pieces, text + FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN, per_crop, FAKE_IMAGE_TOKEN]


def _llama4_span(shape: MediaShape) -> list[str | int]:
    """Llama 4's expanded image (transformers' ``Llama4Processor._prompt_split_image``): for a canvas
    of several tiles, each row's tile runs separated by ``<|tile_x_separator|>`` and ended by
    ``<|tile_y_separator|>``; then ``<|image|>`` and the global tile's run (the only one of a
    one-tile image), inside ``<|image_start|>`` ... ``<|image_end|>``."""
    rows, cols = shape.tiles
    crops, per_crop = _tile_crops(shape)
    pieces: list[str | int] = []
    text = "<|image_start|>"
    if crops > 1:
        for _ in range(rows):
            for c in range(cols):
                pieces += [text, per_crop]
                text = "<|tile_x_separator|>" if c < cols - 1 else ""
            text += "<|tile_y_separator|>"
    return [*pieces, text + "<|image|>", per_crop, "<|image_end|>"]


# text.image_span -> the span rule: an item's shape -> text pieces and media-token runs, in order.
IMAGE_SPANS = {"idefics3": _idefics3_span, "llama4": _llama4_span}


def span_marker_tokens(rule: str, shape: MediaShape) -> int:
    """Marker tokens the span rule ``rule`` puts around an item, without a tokenizer (the planner):
    each ``<tag>`` and each run of newlines one token, as Idefics3's and SmolVLM's tokenizers have them;
    IDEFICS's two ``<fake_token_around_image>`` (one when it follows another image directly)."""
    if rule == "idefics":
        return 2
    return sum(len(re.findall(r"<[^<>]+>|\n+", piece)) for piece in IMAGE_SPANS[rule](shape) if isinstance(piece, str))


def _shape(item) -> MediaShape:
    if isinstance(item, MediaShape):
        return item
    if isinstance(item, int):
        return MediaShape(item)
    return MediaShape(int(item.num_tokens), tuple(getattr(item, "tiles", (1, 1))))


def media_count_error(placeholders: int, items: int, where: str = "the prompt", token: str | None = None,
                      modality: str = "image") -> FeatureCountError:
    """The one message for "placeholders and media disagree", with both counts."""
    mark = f" ({token})" if token else ""
    noun = _ITEM_NOUN.get(modality, f"{modality} item")
    return FeatureCountError(f"{where} has {_plural(placeholders, f'{modality} placeholder')}{mark} but "
                             f"{_plural(items, noun)} {'was' if items == 1 else 'were'} given")


def _counts(media: MediaCounts | Sequence) -> dict[str, list[MediaShape]]:
    if isinstance(media, Mapping):
        return {m: [_shape(c) for c in v] for m, v in media.items() if len(v)}
    return {"image": [_shape(c) for c in media]} if len(media) else {}


class PromptLayout:
    """The prompt rules of one model and tokenizer (``PromptLayout.for_model(config, tokenizer)``).

    ``media`` arguments are the items' token counts per modality, each modality's in its prompt
    order (``MediaItem.num_tokens``): their number is the number of items, and early fusion expands
    by them. A plain list of counts means images.
    """

    def __init__(self, tokenizer: Tokenizer, text: TextConfig, fusion: Fusion,
                 modalities: Sequence[str] = ("image",), model_name: str = "this model") -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.modalities = tuple(modalities)
        # What a prompt marks each item with (Llama 4's prompt <|image|> is not its feature placeholder)
        self.tokens = {m: (text.prompt_image_token if m == "image" and text.prompt_image_token else
                           text.placeholder_tokens[m]) for m in self.modalities}
        self.image_token = text.image_token
        self.fusion = fusion  # the only thing asked of it: placeholder_tokens
        self.has_media = bool(self.modalities)
        self.model_name = model_name
        # Between leading images and the text of a prompt that had no placeholders: LLaVA's
        # "<image>\ntext"; Mllama's processor adds nothing ("<|image|>text").
        # Idefics3 / SmolVLM's template puts nothing between an image part and the text.
        # BLIP-2's processor puts the image tokens straight in front of the bos.
        self.separator = "" if text.bos_after_leading_images or text.image_span or text.images_before_bos else "\n"
        self.frames_text = text.image_span == "idefics"
        self.image_span = IMAGE_SPANS.get(text.image_span)  # an id-level rule (idefics3); IDEFICS's is text

    @classmethod
    def for_model(cls, config: ModelConfig, tokenizer: Tokenizer) -> PromptLayout:
        return cls(tokenizer, config.text, fusion_strategy(config.fusion), config.modalities, config.name)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.image_token_id

    @cached_property
    def _modality_of(self) -> dict[int, str]:
        out = {self.tokenizer.placeholder_id(m): m for m in self.modalities}
        if "image" in self.modalities and self.text.prompt_image_token:
            out = {(self._prompt_image_id if m == "image" else i): m for i, m in out.items()}
        return out

    @cached_property
    def _prompt_image_id(self) -> int:
        token = self.text.prompt_image_token
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise FeatureCountError(f"text.prompt_image_token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def placeholder_ids(self) -> dict[int, str]:
        """The id a prompt marks an item with -> its modality, for the modalities this model takes
        (the placeholder, or ``text.prompt_image_token`` for images)."""
        return self._modality_of

    # ------------------------------------------------------------------ placeholders in text
    def place_media(self, prompt: str, n_items: int | Mapping[str, int]) -> str:
        """``prompt`` with one placeholder per item: put in front for a modality it has none of, else
        checked. ``n_items``: items per modality (an int: images)."""
        return self._place([{"role": "user", "content": prompt}], n_items, "the prompt")[0]["content"]

    def place_media_in_messages(self, messages: Sequence[dict[str, Any]],
                                n_items: int | Mapping[str, int]) -> list[dict[str, Any]]:
        """The same for a conversation (``[{"role": ..., "content": str}]``): placeholders are counted
        over the user turns; a conversation without any gets them in front of its first user turn."""
        return self._place(messages, n_items, "the conversation")

    def _place(self, messages: Sequence[dict[str, Any]], n_items: int | Mapping[str, int],
               where: str) -> list[dict[str, Any]]:
        messages = list(messages)
        wanted = {"image": n_items} if isinstance(n_items, int) else dict(n_items)
        self.check_modalities({m: n for m, n in wanted.items() if n})
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        front = ""
        for modality, token in self.tokens.items():
            n = wanted.get(modality, 0)
            marks = sum(messages[i]["content"].count(token) for i in users)
            if marks == 0 and n and users:
                front += token * n
            elif marks != n:
                raise media_count_error(marks, n, where, token, modality)
        if front:
            first = messages[users[0]]
            messages[users[0]] = {**first, "content": front + self.separator + first["content"]}
        return messages

    def check_modalities(self, given: Mapping[str, Any]) -> None:
        """Refuse media of a modality the model does not take (``given``: modality -> count or items)."""
        other = [m for m in given if m not in self.tokens]
        if not other:
            return
        m = other[0]
        n = len(given[m]) if isinstance(given[m], Sequence) else given[m]
        kind = {"image": "images", "video": "videos"}.get(m, m)
        if not self.has_media:
            raise FeatureCountError(f"{self.model_name} is a text-only model; it takes no {kind} ({n} given)")
        raise FeatureCountError(f"{self.model_name} takes {' and '.join(self.modalities)} input, not {m} "
                                f"({_plural(n, _ITEM_NOUN.get(m, f'{m} item'))} given)")

    # ------------------------------------------------------------------ ids
    def encode(self, prompt: str, media: MediaCounts | Sequence[int] = (), chat: bool = False) -> list[int]:
        """Token ids of ``prompt`` and its media: media placed, the chat template applied as one user
        turn when ``chat`` (else Mllama's bos rule where the tokenizer has it), placeholders expanded
        as the fusion needs."""
        return self.encode_with_order(prompt, media, chat)[0]

    def encode_with_order(self, prompt: str, media: MediaCounts | Sequence[int] = (),
                          chat: bool = False) -> tuple[list[int], list[tuple[str, int]]]:
        """(ids as ``encode``, the media in prompt order as (modality, index within the modality)):
        the order in which the model takes the items."""
        counts = _counts(media)
        prompt = self.place_media(prompt, {m: len(c) for m, c in counts.items()})  # errors name "the prompt"
        if chat:
            return self.encode_conversation_with_order([{"role": "user", "content": prompt}], counts)
        if self.frames_text:  # IdeficsProcessor: its bos as text, the framed prompt, no special tokens added
            ids = self.tokenizer.encode((self.tokenizer.bos_token or "") + self._idefics_frames(prompt), add_bos=False)
        elif not self.has_media:
            ids = self.tokenizer.encode(prompt)
        elif self.text.bos_after_leading_images:
            ids = self._bos_after_leading_images(prompt)
        elif self.text.images_before_bos:
            ids = self._images_before_bos(prompt)
        else:
            ids = self.tokenizer.encode(prompt)  # never doubles a bos the text already starts with
        return self.expand(ids, counts), self.media_order(ids)

    def encode_conversation(self, messages: Sequence[dict[str, Any]],
                            media: MediaCounts | Sequence[int] = ()) -> list[int]:
        """Ids for generating the next assistant turn: media placed, the chat template rendered with
        the generation prompt, tokenized as :meth:`tokenize` does a first piece, expanded."""
        return self.encode_conversation_with_order(messages, media)[0]

    def encode_conversation_with_order(self, messages: Sequence[dict[str, Any]], media: MediaCounts | Sequence[int] = (),
                                       ) -> tuple[list[int], list[tuple[str, int]]]:
        """(ids as ``encode_conversation``, the media in prompt order as ``encode_with_order``)."""
        counts = _counts(media)
        messages = self.place_media_in_messages(messages, {m: len(c) for m, c in counts.items()})
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenize(self._idefics_frames(rendered) if self.frames_text else rendered)
        return self.expand(ids, counts), self.media_order(ids)

    def media_order(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        """The placeholders of unexpanded ``ids`` in order, as (modality, index within the modality)."""
        if not self.has_media:
            return []
        of = self.placeholder_ids()
        seen: dict[str, int] = {}
        order = []
        for i in ids:
            m = of.get(int(i))
            if m is not None:
                order.append((m, seen.get(m, 0)))
                seen[m] = seen.get(m, 0) + 1
        return order

    def tokenize(self, rendered: str, first: bool = True) -> list[int]:
        """Ids of rendered text (a chat template's output, or a piece of it): the first piece gets the
        tokenizer's bos unless it starts with one already, later pieces none."""
        return self.tokenizer.encode(rendered, add_bos=first)

    def _idefics_frames(self, prompt: str) -> str:
        # IdeficsProcessor over [text, image, text, ...]: each text stripped of spaces, each image
        # <fake><image><fake>, or <image><fake> right after another image.
        token, fake = self.image_token, FAKE_IMAGE_TOKEN
        pieces = prompt.split(token)
        out, after_image = pieces[0].strip(" "), False
        for piece in pieces[1:]:
            out += token + fake if after_image else fake + token + fake
            out += piece.strip(" ")
            after_image = not piece.strip(" ")
        return out

    def _images_before_bos(self, prompt: str) -> list[int]:
        # BLIP-2 / InstructBLIP's processor: the image tokens, then the text tokenized as usual (bos first).
        rest, n_lead = prompt, 0
        while rest.startswith(self.image_token):
            rest, n_lead = rest[len(self.image_token):], n_lead + 1
        return [self.image_token_id] * n_lead + self.tokenizer.encode(rest)

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

    def spans(self, ids: Sequence[int], media: MediaCounts | Sequence) -> list[list[int]]:
        """The ids each of ``ids`` becomes in the context: a media item's placeholder its item's span
        (:meth:`item_span`), any other id itself. Raises ``FeatureCountError`` when the placeholders in
        ``ids`` and the items of a modality disagree."""
        ids = [int(i) for i in ids]
        counts = _counts(media)
        self.check_modalities(counts)
        if not self.has_media:
            return [[i] for i in ids]
        of = self.placeholder_ids()
        for m in self.modalities:
            n, given = sum(1 for i in ids if of.get(i) == m), counts.get(m, [])
            if n != len(given):
                raise media_count_error(n, len(given), modality=m)
            if any(c.tokens < 1 for c in given):
                raise FeatureCountError(f"every {m} item needs at least one token, got counts {[c.tokens for c in given]}")
        its = {m: iter(c) for m, c in counts.items()}
        return [self.item_span(next(its[of[i]]), of[i]) if i in of else [i] for i in ids]

    def expand(self, ids: Sequence[int], media: MediaCounts | Sequence) -> list[int]:
        """``ids`` with each media placeholder replaced by its item's span."""
        return [i for span in self.spans(ids, media) for i in span]

    def item_span(self, item, modality: str = "image") -> list[int]:
        """The ids one item (a token count, MediaShape or processed item) takes in the context: its
        placeholder once per media token (early fusion) or once (cross-attention), framed by the
        checkpoint's marker tokens where ``text.image_span`` names a rule (early fusion)."""
        shape = _shape(item)
        pid = self.tokenizer.placeholder_id(modality)
        run = self.fusion.placeholder_tokens(shape.tokens)
        if modality != "image" or self.image_span is None or run != shape.tokens:
            return [pid] * run
        out: list[int] = []
        for piece in self.image_span(shape):
            out += [pid] * piece if isinstance(piece, int) else list(self._marker_ids(piece))
        return out

    @lru_cache(maxsize=256)  # noqa: B019 (one layout per pipeline; a handful of distinct pieces)
    def _marker_ids(self, text: str) -> tuple[int, ...]:
        # Tokenized after the image placeholder (a special token), as inside the reference's
        # expanded prompt: a tokenizer that marks the start of its input treats it as no start.
        pid = self.tokenizer.image_token_id
        ids = self.tokenizer.encode(self.image_token + text, add_bos=False)
        if ids[:1] != [pid]:
            raise FeatureCountError(f"the tokenizer splits {self.image_token!r} before {text!r}; the image "
                                    f"placeholder must be a special token for text.image_span")
        return tuple(ids[1:])

    def media_span(self, items: Sequence, modality: str = "image") -> list[int]:
        """The ids a run of items of one modality takes in the context (their spans in order)."""
        return [i for item in items for i in self.item_span(item, modality)]
