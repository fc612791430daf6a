"""Training data sources: each gives, by index, the turns of a conversation, its images and metadata."""

from __future__ import annotations

from omnifuse.training.config import TrainConfig

__all__ = ["Record", "build_sources"]

Record = tuple[list[tuple[str, str]], list, dict]  # (turns, image sources, meta)


class DiagnosticSource:
    """Questions and answers of the diagnostic set (media as {modality: sources} for samples with
    audio or video); with ``captions``, image descriptions instead (one image each), for the
    contrastive stage."""

    def __init__(self, split: str, size: int, cfg: TrainConfig, captions: bool = False) -> None:
        from omnifuse.training.diagnostic import DiagnosticSet

        weights = cfg.skill_weights if split == "train" else None  # val and test stay balanced
        self.set = DiagnosticSet(split, size, seed=cfg.seed, image_size=cfg.image_size, skills=cfg.skills,
                                 weights=weights)
        self.captions = captions
        # What decides its samples: equal fingerprints mean equal samples at every index.
        self.fingerprint = ("diagnostic", split, size, cfg.seed, cfg.image_size, self.set.cycle, captions)

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int) -> Record:
        s = self.set[i]
        if self.captions:
            from omnifuse.training.diagnostic import caption

            text = caption(self.set.key(i))
            return [("user", ""), ("assistant", text)], [s.images[0]], {"skill": "caption", "answer": text}
        media = list(s.images) if not (s.audio or s.video) else s.media
        return [("user", s.question), ("assistant", s.answer)], media, {"skill": s.skill, "answer": s.answer}


class LlavaSource:
    """LLaVA-format conversations (with ``audio`` and ``video`` fields beside ``image``). Their
    ``<image>`` / ``<audio>`` / ``<video>`` marks become the model's placeholders
    (``placeholder_tokens``, e.g. ``<|image|>`` for Llama 3.2 Vision), so the media stay where the
    file puts them whatever the model."""

    def __init__(self, path: str, cfg: TrainConfig, placeholder_tokens: dict[str, str] | None = None) -> None:
        from omnifuse.training.llava_data import MEDIA_FIELDS, read_llava_json

        self.records, self.warnings = read_llava_json(path, cfg.image_folder, on_error=cfg.on_error)
        tokens = placeholder_tokens or {}
        self.marks = [(mark, tokens.get(m, mark)) for m, (_, mark) in MEDIA_FIELDS.items() if tokens.get(m, mark) != mark]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        r = self.records[i]
        answer = next((t for role, t in reversed(r.turns) if role == "assistant"), "")
        turns = [(role, self._marks(text)) if role == "user" else (role, text) for role, text in r.turns]
        media = r.media
        sources = list(r.images) if set(media) <= {"image"} else {m: list(v) for m, v in media.items()}
        return turns, sources, {"skill": "instruct", "answer": answer, "index": r.index}

    def _marks(self, text: str) -> str:
        for mark, token in self.marks:
            text = text.replace(mark, token)
        return text


class CaptionSource:
    """Image-caption pairs as one-turn conversations: the image, then the caption as the answer."""

    def __init__(self, path: str, cfg: TrainConfig) -> None:
        from omnifuse.training.llava_data import read_caption_pairs

        self.pairs, self.warnings = read_caption_pairs(path, cfg.image_folder, on_error=cfg.on_error)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Record:
        image, caption = self.pairs[i]
        return [("user", ""), ("assistant", caption)], [image], {"skill": "caption", "answer": caption}


def build_sources(cfg: TrainConfig, placeholder_tokens: dict[str, str] | None = None):
    """(train, val) sources for a run; val may be None (no held-out data given).
    ``placeholder_tokens``: the model's, which LLaVA-format ``<image>`` / ``<audio>`` / ``<video>``
    marks become."""
    if cfg.data == "diagnostic":
        captions = cfg.stage == "contrastive"
        return (DiagnosticSource("train", cfg.train_size, cfg, captions),
                DiagnosticSource("val", cfg.val_size, cfg, captions))
    if cfg.data == "llava":
        train = LlavaSource(cfg.data_path, cfg, placeholder_tokens)
        val = LlavaSource(cfg.val_path, cfg, placeholder_tokens) if cfg.val_path else None
    else:
        train = CaptionSource(cfg.data_path, cfg)
        val = CaptionSource(cfg.val_path, cfg) if cfg.val_path else None
    if len(train) == 0:
        from omnifuse.config import ConfigError

        raise ConfigError(f"{cfg.data_path} has no usable records ({len(train.warnings)} rejected)")
    return train, val
