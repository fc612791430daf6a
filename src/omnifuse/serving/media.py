"""Media in requests: where their bytes come from, what a request may carry, and their digests.

A media reference is a ``data:`` URI (base64) or a file under the server's ``--media-root``
(``file:`` URI or a relative path). The server fetches nothing: ``http(s)://`` is refused. A path
that resolves outside the root (``..``, an absolute path elsewhere, a symlink pointing out) is
refused. Limits (``MediaLimits``) are checked before the expensive work where the format allows
(image size from the header, video frames from the sampling contract) and name the limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from omnifuse.errors import RequestError

__all__ = ["MediaError", "MediaLimits", "check_image", "decode_base64", "digest", "read_reference"]


class MediaError(RequestError):
    """A media part that cannot be used; ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MediaLimits:
    max_media: int = 8  # media parts in one request, all kinds together
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 120.0
    max_video_frames: int = 64
    max_media_bytes: int = 20 << 20  # one item's decoded bytes


_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


def decode_base64(payload: str, param: str, limit: int) -> bytes:
    if len(payload) > (limit + 2) // 3 * 4 + 4:
        raise MediaError(f"{param}: the media is more than {limit:,} bytes (the server's limit per item)", param)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{param}: the data is not valid base64", param) from None
    if not data:
        raise MediaError(f"{param}: the data is empty", param)
    return data


def read_reference(url: str, param: str, media_root: Path | None, limit: int) -> bytes:
    """The bytes behind a media reference (``data:`` URI, ``file:`` URI or path under ``media_root``)."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"{param} must be a non-empty string", param)
    if url.startswith("data:"):
        m = _DATA_URI.match(url)
        if m is None or not m.group("b64"):
            raise MediaError(f"{param}: a data: URI must be data:<type>;base64,<data>", param)
        return decode_base64(url[m.end():], param, limit)
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    if scheme and scheme.group(1).lower() in ("http", "https", "ftp"):
        raise MediaError(f"{param}: {scheme.group(1)} URLs are refused: the server fetches nothing; send the media "
                         "as a data: URI (base64)", param)
    if scheme and scheme.group(1).lower() != "file" and len(scheme.group(1)) > 1:
        raise MediaError(f"{param}: unsupported URL scheme {scheme.group(1)!r} (data: or a file under --media-root)",
                         param)
    if media_root is None:
        raise MediaError(f"{param}: file references need the server's --media-root; send the media as a data: URI",
                         param)
    path = url[len("file://"):] if url.startswith("file://") else url[len("file:"):] if url.startswith("file:") else url
    if "\x00" in path or ".." in Path(path).parts:
        raise MediaError(f"{param}: the path may not contain '..' or NUL", param)
    root = media_root.resolve()
    candidate = Path(path) if Path(path).is_absolute() else root / path
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise MediaError(f"{param}: no such file under the media root", param) from None
    if not resolved.is_relative_to(root):  # an absolute path elsewhere, or a symlink pointing out
        raise MediaError(f"{param}: the file is outside the media root", param)
    if not resolved.is_file():
        raise MediaError(f"{param}: not a file", param)
    size = resolved.stat().st_size
    if size > limit:
        raise MediaError(f"{param}: the file is {size:,} bytes, more than the {limit:,} allowed per item", param)
    return resolved.read_bytes()


def check_image(data: bytes, param: str, limits: MediaLimits):
    """``data`` opened as an image (its header read, nothing decoded) once its size is within the
    server's limit; the image processor decodes it (``processing/image.load_image``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{param}: not a readable image ({type(e).__name__})", param) from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise MediaError(f"{param}: the image is {w} x {h} = {w * h:,} pixels, more than the {limits.max_image_pixels:,} "
                         "allowed (--max-image-pixels)", param)
    return image


def digest(modality: str, data: bytes, settings: dict) -> str:
    """The encoder cache's key: the bytes and every setting that shapes the encoder's input."""
    h = hashlib.sha256()
    h.update(modality.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(data)
    return h.hexdigest()
