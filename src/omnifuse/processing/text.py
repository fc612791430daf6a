"""Text side of the model: tokenizers and chat templates (prompt layout: processing/prompt.py).

Two tokenizers share one interface. ``ByteTokenizer`` is UTF-8 bytes plus four special tokens, for
tiny presets and tests; nothing to download. ``HFTokenizer`` wraps a Hugging Face ``tokenizer.json``
with the settings in its ``tokenizer_config.json``. Chat templates are rendered the way transformers
renders them, so a checkpoint's template gives the same prompt here as in transformers'
``apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from omnifuse.config import ModelConfig, TextConfig
from omnifuse.errors import TokenizerError

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "InstructionTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_instruction_tokenizer",
    "load_tokenizer",
    "with_placeholder_ids",
]


# Chat checkpoints end a turn with these rather than (or as well as) their eos token:
# Llama 3 <|eot_id|> / <|end_of_text|>, ChatML (Qwen, SmolLM) <|im_end|>.
_EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer:
    """The interface the model and the generation loop use; subclasses fill in the attributes."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # any of these stops generation
    pad_token_id: int
    chat_template: str | None
    _placeholder_tokens: dict[str, str]  # modality -> placeholder token string (TextConfig)
    _add_bos: bool  # whether encode(add_bos=True) prepends bos for this tokenizer
    _template_tokens: dict[str, str]  # special tokens the chat template sees: bos_token, eos_token, ...

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode(add_bos=True)`` prepends bos (the checkpoint's own setting)."""
        return self._add_bos and self.bos_token_id is not None

    def placeholder_id(self, modality: str) -> int:
        """The id of ``modality``'s placeholder token in this vocabulary."""
        token = self._placeholder_tokens.get(modality)
        if token is None:
            raise TokenizerError(f"text.placeholder_tokens names no {modality} placeholder")
        token_id = self.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{modality} token {token!r} is not in the vocabulary; set text.placeholder_tokens.{modality} "
                "to the checkpoint's placeholder (e.g. '<|image|>' for Llama 3.2 Vision)")
        return token_id

    @property
    def bos_token(self) -> str | None:
        """The bos token's text (what a processor that writes it into the prompt writes)."""
        return self._template_tokens.get("bos_token")

    @property
    def image_token_id(self) -> int:
        return self.placeholder_id("image")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``"<image>"``) become their single id."""
        ids = self._encode_text(text)
        # A rendered chat template usually starts with the bos string already: never add a second.
        if add_bos and self._add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor). Incomplete UTF-8 becomes U+FFFD, never an error."""
        return self._decode_ids(self._check_ids(ids), skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the chat template, as transformers does (HF tokenizer_config convention).

        ``messages``: ``[{"role": "user", "content": "hi"}]``; content may also be a list of parts,
        ``{"type": "text", "text": ...}`` or ``{"type": "image"}``.
        """
        if not self.chat_template:
            raise TokenizerError(
                f"{type(self).__name__} has no chat template; set text.chat_template or give the checkpoint "
                "a chat_template (tokenizer_config.json, chat_template.json or chat_template.jinja)")
        _check_messages(messages)
        template = _compile_template(self.chat_template)
        if _wants_parts(self.chat_template):
            messages = [_as_parts(m, self._placeholder_tokens) for m in messages]
        try:
            # tools/documents are None, not undefined, as in transformers: `tools is not none` is then False.
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **self._template_tokens)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors and arrays
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}")
        return ids


# ---------------------------------------------------------------------------------------------
# Byte tokenizer

_BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<audio>", "<video>")  # ids 256 .. 261
BYTE_SPECIAL_IDS = {tok: 256 + i for i, tok in enumerate(_BYTE_SPECIALS)}
_BYTE_CONTROL = ("<pad>", "<s>", "</s>")

# Plain-text roles ("User: ...\nAssistant: "); assistant turns end in eos so a model trained on
# them learns to stop.
_BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ image_token }}{% elif part['type'] == 'audio' %}{{ audio_token }}"
    "{% elif part['type'] == 'video' %}{{ video_token }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are UTF-8 bytes; 256.. are ``<pad> <s> </s> <image> <audio> <video>``. Only the
    placeholders the config names are special (the others are plain text), and the vocabulary ends
    at the last special in use: 260 for an image model, 261 with audio, 262 with video."""

    def __init__(self, config: TextConfig | None = None) -> None:
        config = config or TextConfig()  # its placeholder tokens are byte specials (checked there)
        used = set(_BYTE_CONTROL) | set(config.placeholder_tokens.values())
        self._special_ids = {tok: i for tok, i in BYTE_SPECIAL_IDS.items() if tok in used}
        self.vocab_size = max(self._special_ids.values()) + 1
        self.pad_token_id = self._special_ids["<pad>"]
        self.bos_token_id = self._special_ids["<s>"]
        self.eos_token_ids = (self._special_ids["</s>"],)
        self.chat_template = config.chat_template or _BYTE_CHAT_TEMPLATE
        self._placeholder_tokens = dict(config.placeholder_tokens)
        self._add_bos = True
        self._template_tokens = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                 **_placeholder_template_tokens(config.placeholder_tokens)}
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in self._special_ids) + ")")

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        raw = token.encode("utf-8")
        return raw[0] if len(raw) == 1 else None

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._special_split.split(text):  # specials land in their own pieces
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run = bytearray()  # bytes are decoded a run at a time so multi-byte characters join up
        for i in ids:
            if i < 256:
                run.append(i)
            elif not skip_special_tokens:
                parts.append(run.decode("utf-8", errors="replace"))
                parts.append(_BYTE_SPECIALS[i - 256])
                run.clear()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


def _placeholder_template_tokens(placeholder_tokens: dict[str, str]) -> dict[str, str]:
    """What a chat template sees of the placeholders: ``image_token``, ``audio_token``, ..."""
    return {f"{modality}_token": token for modality, token in placeholder_tokens.items()}


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with its special tokens and chat template.

    Special tokens found in the vocabulary are registered on ``tokenizer`` in place (see below).
    """

    def __init__(self, tokenizer: Any, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 placeholder_tokens: dict[str, str] | None = None,
                 add_bos_token: bool | None = None, chat_template: str | None = None) -> None:
        from tokenizers import AddedToken

        placeholder_tokens = {"image": "<image>"} if placeholder_tokens is None else dict(placeholder_tokens)
        named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        for name, token in named.items():
            if token is not None and tokenizer.token_to_id(token) is None:
                raise TokenizerError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        # Special tokens must be added tokens so that their strings in text encode to one id and
        # decode(skip_special_tokens=True) drops them; transformers registers them the same way.
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in (*named.values(), *placeholder_tokens.values(), *_EXTRA_STOP_TOKENS)
                   if t and t not in added and tokenizer.token_to_id(t) is not None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        stops = [tokenizer.token_to_id(t) for t in (eos_token, *_EXTRA_STOP_TOKENS) if t]
        self.eos_token_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None and not self.eos_token_ids:
            raise TokenizerError("the tokenizer has neither a pad token nor an eos token to pad with")
        self.pad_token_id = pad_id if pad_id is not None else self.eos_token_ids[0]
        self.chat_template = chat_template or None
        self._placeholder_tokens = placeholder_tokens
        # Follow the checkpoint: an explicit add_bos_token wins, else whatever its post-processor
        # does (Llama adds bos, Qwen / GPT-2 style do not), as transformers' tokenizer(text) would.
        if add_bos_token is None:
            add_bos_token = (self.bos_token_id is not None
                             and tokenizer.encode("", add_special_tokens=True).ids[:1] == [self.bos_token_id])
        self._add_bos = bool(add_bos_token)
        self._template_tokens = {k: v for k, v in named.items() if v is not None}
        self._template_tokens.update(_placeholder_template_tokens(placeholder_tokens))

    @classmethod
    def from_folder(cls, folder: str | Path, config: TextConfig | None = None) -> HFTokenizer:
        """Load ``folder/tokenizer.json`` and, when present, ``tokenizer_config.json`` and the chat
        template files. Special tokens come from tokenizer_config.json first (what the checkpoint was
        trained with), then from ``config`` where those tokens are in the vocabulary."""
        from tokenizers import Tokenizer as RawTokenizer

        config = config or TextConfig(tokenizer="file")
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tokenizer = RawTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {path}: {e}") from e
        settings = _read_json(folder / "tokenizer_config.json")

        def special(name: str) -> str | None:
            token = _token_content(settings.get(name))
            if token is None and name != "unk_token":
                fallback = getattr(config, name)
                token = fallback if tokenizer.token_to_id(fallback) is not None else None
            return token

        return cls(tokenizer, bos_token=special("bos_token"), eos_token=special("eos_token"),
                   pad_token=special("pad_token"), unk_token=special("unk_token"),
                   placeholder_tokens=config.placeholder_tokens, add_bos_token=settings.get("add_bos_token"),
                   chat_template=config.chat_template or _find_chat_template(folder, settings))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _encode_text(self, text: str) -> list[int]:
        # No post-processor: bos is Tokenizer.encode's job (so it is never doubled) and a prompt must
        # not get the eos some post-processors append.
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a token as "<s>" or as an AddedToken dict {"content": "<s>", ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _find_chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    # Newer checkpoints keep the template beside tokenizer_config.json: chat_template.jinja (which
    # transformers prefers), or a processor's chat_template.json.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = folder / "chat_template.json"
    template = (_read_json(json_file) if json_file.is_file() else settings).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) and template else None


# ---------------------------------------------------------------------------------------------
# Chat templates


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers replaces jinja's tojson, which HTML-escapes; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _make_environment() -> ImmutableSandboxedEnvironment:
    # The environment transformers renders chat templates in; templates come from checkpoints, so
    # they are untrusted code and run sandboxed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENVIRONMENT = _make_environment()


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _ENVIRONMENT.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def _wants_parts(template: str) -> bool:
    """Whether a template reads message content only as a list of typed parts (most multimodal
    checkpoints' templates: Idefics3, SmolVLM, Mllama) rather than also as a string."""
    return "is string" not in template and re.search(r"""\[\s*['"]type['"]\s*\]|\.type\b""", template) is not None


def _as_parts(message: dict[str, Any], placeholders: dict[str, str]) -> dict[str, Any]:
    """A string content as the parts such a template expects: each placeholder a ``{"type": modality}``
    part, the text between ``{"type": "text"}`` parts (none empty), in order."""
    content = message.get("content")
    if not isinstance(content, str):
        return message
    marks = {token: modality for modality, token in placeholders.items() if token}
    if not marks:
        return {**message, "content": [{"type": "text", "text": content}]}
    pieces = re.split("(" + "|".join(re.escape(t) for t in sorted(marks, key=len, reverse=True)) + ")", content)
    parts = [{"type": marks[p]} if p in marks else {"type": "text", "text": p} for p in pieces if p]
    return {**message, "content": parts}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise TokenizerError(f"message {i} must be a dict with a 'role', got {message!r}")
        content = message.get("content")
        if isinstance(content, list) and not all(isinstance(p, dict) and "type" in p for p in content):
            raise TokenizerError(f"message {i}: content parts must be dicts with a 'type' "
                                 "({'type': 'text', 'text': ...} or {'type': 'image'})")


# ---------------------------------------------------------------------------------------------


def load_tokenizer(config: TextConfig, folder: str | Path | None = None) -> Tokenizer:
    """The tokenizer ``config`` names: built-in bytes, or the checkpoint ``folder``'s tokenizer.json."""
    if config.tokenizer == "bytes":
        return ByteTokenizer(config)
    if folder is None:
        raise TokenizerError("text.tokenizer is 'file' but no checkpoint folder was given")
    return HFTokenizer.from_folder(folder, config)


def with_placeholder_ids(config: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """``config`` with every placeholder id the tokenizer knows filled in, before a model is built
    from it (a ``file`` tokenizer's ids are only known once it is read). Ids the config already
    gives must be the tokenizer's: a checkpoint and a tokenizer that disagree are refused."""
    text = config.text
    ids = dict(text.placeholder_ids)
    for modality, token in text.placeholder_tokens.items():
        found = tokenizer.token_to_id(token)
        given = ids.get(modality)
        if given is not None and found is not None and given != found:
            raise TokenizerError(f"the model's {modality} token id {given} differs from the tokenizer's "
                                 f"id {found} for {token!r}")
        if given is None and found is not None:
            ids[modality] = found
    if ids == text.placeholder_ids:
        return config
    return dataclasses.replace(config, text=dataclasses.replace(text, placeholder_ids=ids))


class InstructionTokenizer:
    """The second tokenizer of a model whose connector reads the prompt (InstructBLIP's Q-Former, a
    BERT WordPiece vocabulary): the prompt's ids as that tokenizer's ``tokenizer.json`` makes them,
    its own special tokens included ("[CLS] ... [SEP]"), as transformers' processor passes them."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RawTokenizer

        if not path.is_file():
            raise TokenizerError(f"instruction tokenizer file not found: {path} (text.instruction_tokenizer)")
        try:
            self._tok = RawTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read {path}: {e}") from e
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


def load_instruction_tokenizer(config: TextConfig, folder: str | Path | None) -> InstructionTokenizer | None:
    """The instruction tokenizer ``config.instruction_tokenizer`` names inside ``folder`` (None when
    the model has none)."""
    if not config.instruction_tokenizer:
        return None
    if folder is None:
        raise TokenizerError("text.instruction_tokenizer names a folder inside the checkpoint, but no checkpoint "
                             "folder was given")
    return InstructionTokenizer(Path(folder) / config.instruction_tokenizer / "tokenizer.json")
