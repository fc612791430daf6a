"""Images to pixel crops: loading, resizing by mode, normalisation and exact visual-token counts.

Three modes (``ImageConfig.mode``):

- ``fixed``: one ``S x S`` crop by stretching, LLaVA-1.5 padding to a square, or CLIP's shortest
  edge resize plus centre crop (pixel-identical to Hugging Face ``CLIPImageProcessor``).
- ``dynamic``: one crop at native aspect ratio with sides that are multiples of the patch size
  (Qwen2-VL ``smart_resize``, counted in patches instead of pixels).
- ``tiles``: Llama 3.2 Vision's best-fit canvas of ``S x S`` tiles (pixel-identical to Hugging Face
  ``MllamaImageProcessor``), optionally followed by a low-resolution overview crop.

``ImageProcessor.num_tokens(width, height)`` is a pure function of the image size, so a prompt can
be laid out (and its cost known) before any pixel is decoded; it always equals the count of the
crops that ``__call__`` returns.
"""

from __future__ import annotations

import io
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from omnifuse.config import ConfigError, ImageConfig
from omnifuse.errors import ImageError
from omnifuse.processing.resample import pad_resize
from omnifuse.processing.tiles import best_canvas, rescale_longest_edge, supported_aspect_ratios

__all__ = [
    "ImageError",
    "ImageProcessor",
    "ProcessedImage",
    "aspect_ratio_id",
    "load_image",
]

ImageSource = str | Path | bytes | bytearray | Image.Image

# Pillow >= 9.1 moved the filters into an enum; the old module constants still work on 10+.
_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR
_LANCZOS = Image.Resampling.LANCZOS
# Fixed mode builds no intermediate image above this many pixels: a thin image takes a bounded path
# instead (CLIP crop: resample only the box behind the crop; LLaVA pad: _pad_resize, which never
# builds the padded square, also taken above max_pixels: processing/resample.py). See ImageProcessor._fixed.
_MAX_INTERMEDIATE_PIXELS = 16_000_000


# ---------------------------------------------------------------------------------------------
# Loading


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return str(source)


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image {name} has zero size ({width} x {height})")
    if width * height > max_pixels:
        raise ImageError(f"image {name} has {width} x {height} = {width * height} pixels, "
                         f"more than max_pixels = {max_pixels}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white (what a viewer shows)."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # Pillow converts 16-bit to 8-bit by clipping at 255, which turns most images white;
        # rescale the 16-bit range instead (files opened as "I" are 16-bit PNG/TIFF data).
        arr = np.asarray(img, dtype=np.float64)  # (H, W)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img  # already a copy: exif_transpose never returns its input
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image mode {img.mode!r} to RGB: {e}") from None


def load_image(source: ImageSource, max_pixels: int = 64_000_000) -> Image.Image:
    """Open ``source`` (a path, encoded bytes or a PIL image) as an upright RGB image.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. Every failure is an ``ImageError``.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
        opened = None
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.exists():
                raise ImageError(f"image file not found: {path}")
            if not path.is_file():
                raise ImageError(f"image path is not a file: {path}")
            if path.stat().st_size == 0:
                raise ImageError(f"image file is empty (0 bytes): {path}")
            fp: object = str(path)
        elif isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise ImageError("image bytes are empty (0 bytes)")
            fp = io.BytesIO(bytes(source))
        else:
            raise ImageError(f"image source must be a path, bytes or PIL.Image.Image, "
                             f"got {type(source).__name__}")
        try:
            with warnings.catch_warnings():
                # Our own max_pixels check below governs; PIL's hard DecompressionBombError (twice
                # its MAX_IMAGE_PIXELS) still applies and becomes an ImageError.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(fp)  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {name} is too large to decode: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            raise ImageError(f"cannot decode image {name}: {e}") from None
        img = opened

    try:
        _check_pixels(img.width, img.height, max_pixels, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()  # decode now, so a truncated file fails here and not later
                img = ImageOps.exif_transpose(img)
        except Image.DecompressionBombError as e:
            raise ImageError(f"image {name} is too large to decode: {e}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"cannot decode image {name}: {e}") from None
        return _to_rgb(img)
    finally:
        if opened is not None:
            opened.close()


# ---------------------------------------------------------------------------------------------
# Llama 3.2 tile canvas (Hugging Face MllamaImageProcessor; these must match it exactly). The
# canvas list and choice live in processing/tiles.py, (rows, cols) everywhere.


def aspect_ratio_id(rows: int, cols: int, max_tiles: int) -> int:
    """Mllama's aspect-ratio id: the 1-based index of (rows, cols) among the supported canvases
    (0 is kept for batch padding)."""
    ratios = supported_aspect_ratios(max_tiles)
    if (rows, cols) not in ratios:
        raise ImageError(f"tile canvas {rows} x {cols} (rows x cols) is not supported with max_tiles = {max_tiles}")
    return ratios.index((rows, cols)) + 1


def _fit_to_canvas(width: int, height: int, canvas_w: int, canvas_h: int, tile: int) -> tuple[int, int]:
    """(w, h) of Mllama's get_image_size_fit_to_canvas: aspect kept, each side clipped to
    [tile, canvas] before choosing the limiting one."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return target_w, min(math.floor(height * scale_w) or 1, target_h)
    return min(math.floor(width * scale_h) or 1, target_w), target_h


# ---------------------------------------------------------------------------------------------
# Processing


@dataclass(frozen=True)
class ProcessedImage:
    """An image as a media item (``omnifuse.processing.media.MediaItem``)."""

    pixel_values: torch.Tensor  # (N_crops, 3, H, W) float32, normalised
    num_tokens: int  # visual tokens the model produces for this image: crops * tokens per crop
    grid: tuple[int, int]  # (patch rows, patch cols) of each crop
    tiles: tuple[int, int]  # (rows, cols) of the tile canvas in "tiles" and "split" modes, else (1, 1)
    original_size: tuple[int, int]  # (width, height) after EXIF transpose
    # The encoder's keyword arguments; default {"pixel_values": pixel_values} (a per-crop ViT).
    inputs: dict[str, torch.Tensor] | None = None
    attendable: torch.Tensor | None = None  # (num_tokens,) bool; None: every token
    # The vision encoder's output for these crops when a frozen encoder already computed it
    # (training reuses it instead of encoding the pixels again).
    features: torch.Tensor | None = None
    modality: str = "image"
    keep: torch.Tensor | None = None  # every token the encoder and connector make is the image's
    # (L,) long: the prompt in the connector's own vocabulary, for a connector that reads it with
    # the image (InstructBLIP's Q-Former); set by the prompt layout (Pipeline.prompt_and_media).
    instruction: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inputs is None:
            object.__setattr__(self, "inputs", {"pixel_values": self.pixel_values})


class ImageProcessor:
    """Turns images into normalised crops for a ViT with ``patch_size`` patches.

    ``cls_tokens`` is the number of extra tokens per crop the encoder hands on (1 when a CLS token
    is kept, ``VisionConfig.cls_tokens``).
    """

    def __init__(self, config: ImageConfig, patch_size: int, cls_tokens: int = 0, tiled_encoder: bool = False,
                 crop_tokens: Callable[[tuple[int, int]], int] | None = None):
        """``tiled_encoder``: the encoder takes whole tiled images (Mllama: all ``max_tiles`` tiles,
        an aspect-ratio id and a tile mask per image) rather than a batch of crops.
        ``crop_tokens(grid)``: the tokens the connector makes of one crop's (rows, cols) patch grid
        and its class tokens (default: one per feature, ``rows * cols + cls_tokens``)."""
        if patch_size <= 0:
            raise ConfigError(f"patch_size must be positive, got {patch_size}")
        if cls_tokens < 0:
            raise ConfigError(f"cls_tokens must be >= 0, got {cls_tokens}")
        if config.mode in ("fixed", "tiles") and config.image_size % patch_size:
            raise ConfigError(f"image.image_size {config.image_size} is not a multiple of "
                              f"patch_size {patch_size}")
        if tiled_encoder and not (config.mode == "tiles" and config.pad_tiles):
            raise ConfigError("a tiled encoder (vision.type mllama) needs image.mode tiles with pad_tiles")
        self.config = config
        self.patch_size = patch_size
        self.cls_tokens = cls_tokens
        self.tiled_encoder = tiled_encoder
        self.crop_tokens = crop_tokens or (lambda grid: grid[0] * grid[1] + cls_tokens)
        # device="cpu" explicitly: a model built under `with torch.device("meta")` builds this too.
        self._mean = torch.tensor(config.mean, dtype=torch.float32, device="cpu").view(3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32, device="cpu").view(3, 1, 1)

    # --- sizes from metadata only ------------------------------------------------------------

    def _dynamic_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) in patches: Qwen2-VL smart_resize with patches as the unit."""
        cfg, p = self.config, self.patch_size
        rows = max(1, round(height / p))
        cols = max(1, round(width / p))
        if rows * cols > cfg.max_patches:
            beta = math.sqrt(height * width / (cfg.max_patches * p * p))
            rows = max(1, math.floor(height / beta / p))
            cols = max(1, math.floor(width / beta / p))
        elif rows * cols < cfg.min_patches:
            beta = math.sqrt(cfg.min_patches * p * p / (height * width))
            rows = math.ceil(height * beta / p)
            cols = math.ceil(width * beta / p)
        # Float rounding, and the one-patch floor on a very thin side, can overshoot the budget:
        # shrink the longer side until it fits (at 1 x 1 it always does, as max_patches >= 1).
        while rows * cols > cfg.max_patches:
            if cols >= rows:
                cols = max(1, min(cols - 1, cfg.max_patches // rows))
            else:
                rows = max(1, min(rows - 1, cfg.max_patches // cols))
        return rows, cols

    def _check_size(self, width: int, height: int) -> None:
        if not (isinstance(width, numbers.Integral) and isinstance(height, numbers.Integral)) \
                or width <= 0 or height <= 0:
            raise ImageError(f"image size must be positive integers, got {width} x {height}")

    def _split_sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Split mode: ((w, h) after the longest-edge resize, (w, h) rounded up to whole tiles),
        with the reference's arithmetic (Idefics3ImageProcessor: truncation, odd sides made even)."""
        s = self.config.image_size
        w, h = rescale_longest_edge(width, height, self.config.longest_edge or 4 * s)
        aspect = w / h  # then to multiples of the tile, from the resized sides
        if w >= h:
            w2 = math.ceil(w / s) * s
            h2 = math.ceil(int(w2 / aspect) / s) * s
        else:
            h2 = math.ceil(h / s) * s
            w2 = math.ceil(int(h2 * aspect) / s) * s
        return (w, h), (w2, h2)

    def canvas(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of the tile canvas in "tiles" and "split" modes; (1, 1) in the others."""
        self._check_size(width, height)
        if self.config.mode == "split":
            (_, _), (w2, h2) = self._split_sizes(width, height)
            return h2 // self.config.image_size, w2 // self.config.image_size
        if self.config.mode != "tiles":
            return (1, 1)
        return best_canvas(width, height, self.config.image_size, self.config.max_tiles)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) the image content is resized to: the crop itself in "fixed" / "dynamic" mode,
        the image inside the (zero-padded) canvas in "tiles" mode."""
        self._check_size(width, height)
        cfg, s = self.config, self.config.image_size
        if cfg.mode == "fixed":
            return (s, s)
        if cfg.mode == "dynamic":
            rows, cols = self._dynamic_grid(width, height)
            return (cols * self.patch_size, rows * self.patch_size)
        if cfg.mode == "split":
            return self._split_sizes(width, height)[1]
        rows, cols = self.canvas(width, height)
        return _fit_to_canvas(width, height, cols * s, rows * s, s)

    def layout(self, width: int, height: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(number of crops, patch grid per crop, tile canvas)."""
        cfg, p = self.config, self.patch_size
        if cfg.mode == "dynamic":
            return 1, self._dynamic_grid(width, height), (1, 1)
        side = cfg.image_size // p
        if cfg.mode == "fixed":
            return 1, (side, side), (1, 1)
        rows, cols = self.canvas(width, height)
        if cfg.mode == "split":  # the tiles and the whole image, or one crop
            return (1 if rows * cols == 1 else rows * cols + 1), (side, side), (rows, cols)
        crops = cfg.max_tiles if cfg.pad_tiles else rows * cols + int(self._overview(rows, cols))
        return crops, (side, side), (rows, cols)

    def _overview(self, rows: int, cols: int) -> bool:
        """Whether a tiles-mode canvas of (rows, cols) gets the overview crop."""
        return self.config.overview and (self.config.overview_when == "always" or rows * cols > 1)

    def num_tokens(self, width: int, height: int) -> int:
        """Visual tokens for a ``width x height`` image (size after EXIF transpose)."""
        self._check_size(width, height)
        crops, grid, _ = self.layout(width, height)
        return crops * self.crop_tokens(grid)

    def num_attended_tokens(self, width: int, height: int) -> int:
        """Visual tokens text may attend to: all of ``num_tokens`` but the padding tiles of
        ``pad_tiles`` (Mllama), which are encoded and cached at prefill and never attended."""
        self._check_size(width, height)
        crops, grid, (rows, cols) = self.layout(width, height)
        if self.config.mode == "tiles" and self.config.pad_tiles:
            crops = rows * cols
        return crops * self.crop_tokens(grid)

    # --- pixels ------------------------------------------------------------------------------

    def _normalise(self, img: Image.Image) -> torch.Tensor:
        """RGB uint8 image -> (3, H, W) float32, (x / 255 - mean) / std."""
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        if self.config.normalise_dtype == "bfloat16":  # Llama 4: x * (1/255), then the normalisation, in bf16
            x = x.to(torch.bfloat16) * (1 / 255)
            return ((x - self._mean.to(torch.bfloat16)) / self._std.to(torch.bfloat16)).float()
        return (x.to(torch.float32) / 255.0 - self._mean) / self._std

    def _fixed(self, img: Image.Image) -> Image.Image:
        cfg, s = self.config, self.config.image_size
        w, h = img.size
        if cfg.resize == "resize":
            return img.resize((s, s), _BICUBIC)
        if cfg.resize == "pad":
            # LLaVA-1.5 expand2square: centre on a square of the mean colour, then resize.
            if w != h:
                fill = tuple(int(255 * m) for m in cfg.mean)  # LLaVA and HF truncate, not round
                side = max(w, h)
                if side * side > min(_MAX_INTERMEDIATE_PIXELS, cfg.max_pixels):
                    # 100000 x 1 would need a 100000^2 square: same pixels, computed without it.
                    return pad_resize(img, fill, s)
                square = Image.new("RGB", (side, side), fill)
                square.paste(img, ((side - w) // 2, (side - h) // 2))
                img = square
            return img.resize((s, s), _BICUBIC)
        # CLIP: shortest edge to s (HF get_resize_output_image_size), then HF center_crop offsets.
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        new_w, new_h = (s, new_long) if w <= h else (new_long, s)
        left, top = (new_w - s) // 2, (new_h - s) // 2
        if new_w * new_h <= _MAX_INTERMEDIATE_PIXELS:
            return img.resize((new_w, new_h), _BICUBIC).crop((left, top, left + s, top + s))
        # A very thin image would need a huge intermediate (1 x 5000 at s=224 is 224 x 1.1M): resample
        # only the source box behind the crop, one axis at a time in Pillow's order (a two-axis box
        # gives different pixels in Pillow). Equal to the path above up to float rounding of the
        # box edges: at most 1/255 on a few pixels.
        sx, sy = w / new_w, h / new_h
        x0, x1, y0, y1 = left * sx, (left + s) * sx, top * sy, (top + s) * sy
        # The first pass covers only the lines the second reads (bicubic windows reach
        # 2 * max(scale, 1) past the box): all rows of a tall image make an s x h intermediate.
        rx, ry = 2 * max(sx, 1.0) + 1, 2 * max(sy, 1.0) + 1
        c0, c1 = max(0, int(x0 - rx)), min(w, math.ceil(x1 + rx))
        r0, r1 = max(0, int(y0 - ry)), min(h, math.ceil(y1 + ry))
        if h - new_h > 0 and 2 * (w - new_w) < h - new_h:  # ImagingResampleInner: vertical first
            img = img.crop((c0, 0, c1, h)).resize((c1 - c0, s), _BICUBIC, box=(0, y0, c1 - c0, y1))
            return img.resize((s, s), _BICUBIC, box=(x0 - c0, 0, x1 - c0, s))
        img = img.crop((0, r0, w, r1)).resize((s, r1 - r0), _BICUBIC, box=(x0, 0, x1, r1 - r0))
        return img.resize((s, s), _BICUBIC, box=(0, y0 - r0, s, y1 - r0))

    def _tiles(self, img: Image.Image) -> tuple[list[Image.Image], tuple[int, int]]:
        cfg, s = self.config, self.config.image_size
        rows, cols = self.canvas(*img.size)
        # Mllama: bilinear resize into the canvas, zero (black) padding right and bottom before
        # normalisation, then row-major s x s tiles.
        canvas = Image.new("RGB", (cols * s, rows * s), (0, 0, 0))
        canvas.paste(img.resize(self.target_size(*img.size), _BILINEAR), (0, 0))
        crops = [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
                 for r in range(rows) for c in range(cols)]
        if self._overview(rows, cols):  # whole image, low resolution
            crops.append(img.resize((s, s), _BILINEAR if cfg.overview_resample == "bilinear" else _BICUBIC))
        return crops, (rows, cols)

    def _split(self, img: Image.Image) -> tuple[list[Image.Image], tuple[int, int]]:
        # Idefics3: two Lanczos resizes (longest edge, then whole tiles), row-major tiles, then the
        # resized image squeezed to one tile.
        s = self.config.image_size
        first, tiled = self._split_sizes(*img.size)
        img = img.resize(first, _LANCZOS).resize(tiled, _LANCZOS)
        rows, cols = tiled[1] // s, tiled[0] // s
        if rows * cols == 1:
            return [img], (1, 1)
        crops = [img.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        return crops + [img.resize((s, s), _LANCZOS)], (rows, cols)

    def __call__(self, source: ImageSource) -> ProcessedImage:
        img = load_image(source, max_pixels=self.config.max_pixels)
        width, height = img.size
        mode = self.config.mode
        tiles = (1, 1)
        if mode == "fixed":
            crops = [self._fixed(img)]
        elif mode == "dynamic":
            crops = [img.resize(self.target_size(width, height), _BICUBIC)]  # Qwen2-VL: bicubic
        elif mode == "split":
            crops, tiles = self._split(img)
        else:
            crops, tiles = self._tiles(img)
        pixel_values = torch.stack([self._normalise(c) for c in crops])  # (N_crops, 3, H, W)
        if mode == "tiles" and self.config.pad_tiles:  # Mllama pads after normalising: zeros
            pad = self.config.max_tiles - pixel_values.shape[0]
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros(pad, *pixel_values.shape[1:])])

        n_crops, grid, _ = self.layout(width, height)
        p = self.patch_size
        expected = (n_crops, 3, grid[0] * p, grid[1] * p)
        if tuple(pixel_values.shape) != expected:  # the token count would silently be wrong
            raise AssertionError(f"pixel_values {tuple(pixel_values.shape)} != layout {expected} "
                                 f"for a {width} x {height} image in {mode!r} mode")
        num_tokens = self.num_tokens(width, height)
        inputs, attendable = {"pixel_values": pixel_values}, None
        if mode == "tiles" and self.config.pad_tiles:
            # Padded tiles are encoded and cached (as Llama 3.2 Vision does) but never attended.
            real = tiles[0] * tiles[1]
            attendable = torch.zeros(num_tokens, dtype=torch.bool)
            attendable[:real * (num_tokens // n_crops)] = True
            if self.tiled_encoder:
                mask = torch.zeros(1, n_crops, dtype=torch.long)
                mask[0, :real] = 1
                inputs = {"pixel_values": pixel_values[None],  # (1, max_tiles, 3, S, S)
                          "aspect_ratio_ids": torch.tensor([aspect_ratio_id(*tiles, self.config.max_tiles)]),
                          "aspect_ratio_mask": mask}
        return ProcessedImage(pixel_values=pixel_values, num_tokens=num_tokens, grid=grid, tiles=tiles,
                              original_size=(width, height), inputs=inputs, attendable=attendable)
