"""A media item: what a processor makes of one source, and all the model needs to know of it.

Every modality's processor returns items with these attributes; the model groups items by
modality, calls that modality's encoder with ``encoder(**inputs)`` (the inputs of items with the
same shapes concatenated along their first axis) and its connector on the output, and checks
the result has ``num_tokens`` tokens. The model knows nothing of tiles, frames or sample rates.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["MediaItem"]


@runtime_checkable
class MediaItem(Protocol):
    modality: str  # "image"; a key of the model's encoders, connectors and placeholder tokens
    # The encoder's keyword arguments, each with a leading axis that the encoder's output keeps
    # (crops for a ViT, 1 for a tiled encoder that sees the whole item).
    inputs: dict[str, torch.Tensor]
    num_tokens: int  # tokens the item gives the decoder: those the encoder + connector produce, or the kept ones
    # (N,) bool over the encoder + connector's tokens (flattened) when only some belong to the item
    # (an audio chunk's padding); None: all of them.
    keep: torch.Tensor | None
    attendable: torch.Tensor | None  # (num_tokens,) bool: tokens text may attend to; None = all
    # The encoder's output when a frozen encoder already computed it (training reuses it).
    features: torch.Tensor | None
