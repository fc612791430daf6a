"""Records of a training source as examples: media processed, prompts laid out, unusable rows
counted with their reasons, and a frozen encoder's features computed once per image.

A record is ``(turns, media sources, meta)`` (``training/sources.py``). Media that cannot be used
(an image that does not decode, one too large) skips its record with a warning naming it
(``on_error: skip``) or stops the run with a DataFormatError naming it (``on_error: raise``).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from omnifuse.errors import AudioError, DataFormatError, ImageError, VideoError
from omnifuse.training.collate import Example, ExampleBuilder, by_modality

__all__ = ["ExampleReader"]


class ExampleReader:
    def __init__(self, model, builder: ExampleBuilder, on_error: str = "skip", data_name: str = "data",
                 shared_features: dict | None = None) -> None:
        """``data_name``: how errors name the data (its path). ``shared_features``: a dict in which
        a frozen vision encoder's output is kept per record image (keyed by the source's
        ``fingerprint``, the record and the image), so each image is encoded once, and once for all
        the readers given the same dict; the caller guarantees the encoder does not learn and its
        weights are the same for all of them."""
        self.model, self.builder = model, builder
        self.on_error, self.data_name = on_error, data_name
        self.shared_features = shared_features
        self.skipped_media: dict[str, str] = {}  # "record N" -> why its media could not be used

    def media(self, record, i: int) -> dict | None:
        """The record's processed media, {modality: items}, or None when one cannot be used
        (skipped, and named on stderr the first time) under ``on_error: skip``."""
        _turns, sources, meta = record
        try:
            out = {}
            for modality, srcs in by_modality(sources).items():
                processor = self.model.processors.get(modality)
                if processor is None:
                    raise DataFormatError(f"{self.data_name}: record {meta.get('index', i)} has {modality} but "
                                          f"{self.model.config.name} takes {', '.join(self.model.config.modalities) or 'no media'}")
                out[modality] = [processor(s) for s in srcs]
            return out
        except (ImageError, AudioError, VideoError) as e:
            where = f"record {meta.get('index', i)}"
            if self.on_error == "raise":
                raise DataFormatError(f"{self.data_name}: {where}: {e}") from None
            if where not in self.skipped_media:
                self.skipped_media[where] = str(e)
                print(f"omnifuse: warning: skipped {where}: {e}", file=sys.stderr, flush=True)
            return None

    def examples(self, source, indices: list[int]) -> list[Example]:
        """The usable examples of ``source``'s records ``indices``, in order."""
        out, rows = [], []
        for i in indices:
            record = source[i]
            media = self.media(record, i)
            ex = self.builder.build(record[0], media, record[2]) if media is not None else None
            if ex is not None:
                out.append(ex)
                rows.append(i)
        fingerprint = getattr(source, "fingerprint", None)
        if self.shared_features is not None and fingerprint is not None:
            self._reuse_features(fingerprint, rows, out)
        return out

    @torch.no_grad()
    def _reuse_features(self, fingerprint: tuple, rows: list[int], examples: list[Example]) -> None:
        """Give every image of ``examples`` its frozen vision encoder output from ``shared_features``,
        encoding (in one batch) the images seen for the first time. Other media are encoded as they
        come (their encoders may learn)."""
        cache = self.shared_features
        new = [((fingerprint, i, j), img) for i, ex in zip(rows, examples) for j, img in enumerate(ex.images)
               if img.modality == "image" and (fingerprint, i, j) not in cache]
        if new:
            for (key, _), feats in zip(new, self.model.media_features([img for _, img in new])):
                cache[key] = feats
        for i, ex in zip(rows, examples):
            ex.images = [dataclasses.replace(img, features=cache[(fingerprint, i, j)]) if img.modality == "image" else img
                         for j, img in enumerate(ex.images)]

    def unusable_reasons(self) -> str:
        """Why rows were not usable so far: truncation drops and skipped media, with an example."""
        reasons = []
        if self.builder.dropped:
            reasons.append(f"{self.builder.dropped} rows dropped by truncation ({self.builder.last_drop})")
        if self.skipped_media:
            reasons.append(f"{len(self.skipped_media)} records skipped for their media "
                           f"(first: {next(iter(self.skipped_media.items()))})")
        return "; ".join(reasons) or "every row was empty"
