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


def read_media_bytes(source, name: str, error: type[Exception], expected: str) -> bytes:
    """The bytes of a media ``source`` (a path or the bytes themselves); ``error`` names the source
    when it is missing, unreadable or empty, and says ``expected`` (what the caller's sources may
    be, e.g. "an audio source is a path, bytes or (samples, rate)") for one of another type."""
    from pathlib import Path

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise error(f"{name} not found")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise error(f"cannot read {name}: {e}") from None
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise error(f"{expected}, got {type(source).__name__}")
    if not data:
        raise error(f"{name} is empty")
    return data


def open_av_stream(data: bytes, kind: str, name: str, error: type[Exception]):
    """(container, its first ``kind`` stream: "audio" or "video") of a file's bytes, through PyAV;
    ``error`` names the file when FFmpeg cannot open it or it has no such stream. The caller
    closes the container (``with container:``)."""
    import io

    import av

    try:
        container = av.open(io.BytesIO(data))
    except av.FFmpegError as e:
        raise error(f"cannot decode {name}: {e}") from None
    streams = getattr(container.streams, kind)
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise error(f"{name} has no {kind} stream (streams: {', '.join(kinds)})")
    if streams[0].codec_context is None:  # the container names a codec FFmpeg cannot decode
        container.close()
        raise error(f"{name}: its {kind} codec is not supported (FFmpeg has no decoder for it)")
    return container, streams[0]
