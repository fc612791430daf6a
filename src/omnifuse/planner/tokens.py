"""Image, audio and video token counts by each vendor's published rule, for ``omnifuse plan``.

Pure Python (no torch). The authority is ``reference/token_rules.md`` (read 2025); every rule names
the vendor page or processor source it follows. "Tokens" are positions in the language model's
context. Cross-attention models (Llama 3.2 Vision, Flamingo) put one placeholder per image in the
context and report the encoder states their cross-attention reads apart from the context, as two
counts: ``cross_states_prefill`` (encoded and turned into K/V at prefill; Llama 3.2 Vision pads every
image to 4 tiles and encodes the padding too) and ``cross_states_decode`` (the states decode tokens
attend to: the real tiles' states of every image, the images sitting together before the text).

Markup convention: ``context_tokens`` counts the media positions the processor inserts (``<image>``
or soft tokens, and LLaVA-NeXT's newline features). Fixed wrapper tokens are added only where the
published total includes them (Qwen: +2 vision start/end; Llama 4: tile separators and +3);
elsewhere (Idefics3/SmolVLM, Gemma 3) the note names them.

Where a source is ambiguous the documented reading is the default and the alternative is a
``TokenOptions`` value:

- ``openai_multiplier_rounding``: the doc multiplies gpt-4.1-mini/nano patches by 1.62/2.46 without
  saying how the product is rounded. Default ``"ceil"``: billing is in whole tokens and a planner
  must not under-count a context; ``"floor"`` is what open-source calculators do (``int()``), and
  ``"round"`` rounds half up. They differ by at most one token.
- ``gemini_image_rule`` (gemini-2.0-flash): ``"tiles768"`` = reading A, n = ceil(W/768)*ceil(H/768)
  (the common reading of the tokens page); ``"crop_unit"`` = reading B, the crop unit rule the
  image page gave for 1.5; ``"flat258"`` = 258 per image as observed from gemini-2.5-pro
  (googleapis/python-genai#1349), so it also applies to gemini-2.5-pro.
- gemini-2.5-pro images follow the 2.5 media_resolution table (2.0 has no levels, so
  ``media_resolution`` is not applied to 2.0 images). Its default (``None``) is the table's
  UNSPECIFIED: 256 + Pan&Scan, which the table sizes as ~2048; the Pan&Scan crop rule is not
  published, so UNSPECIFIED and HIGH count the documented 2048 for any image size.
- ``gemini_video_rule``: default ``"per_frame"``, the video-understanding page (the page that
  documents video): frames sampled at ``fps`` (default 1, as the API samples) x tokens per frame,
  plus 32/s audio; per-frame tokens follow ``media_resolution`` (2.0: 258, 66 at LOW, from the video
  page; 2.5: 256, 64 at LOW, from the 2.5 table); metadata (~10/s) is not counted. ``"per_second_263"``
  is the tokens page's flat rate for the whole clip.
- ``gemini_audio_rule``: ``"per_second_32"`` (current audio page) or ``"per_second_25"`` (earlier).
- ``claude_rule``: ``"area750"`` = ceil(W*H/750), the page's long-standing formula; ``"patch28"`` =
  ceil(W/28)*ceil(H/28), a newer page revision. Resizing is not published exactly: an image whose
  long edge exceeds 1568 or whose count exceeds 1600 is scaled by
  min(1568/long_edge, sqrt(1600*A/(W*H))) (A = 750 or 28**2), keeping aspect ratio, sides floored
  to whole pixels. Which images are resized follows the page's table of the largest sizes kept as
  they are (1092x1092, 951x1268, 896x1344, 819x1456, 784x1568): an image is resized when its long
  edge exceeds 1568 or its area exceeds the table's largest, 784x1568, so the table's own sizes
  count 1590-1640 tokens, as the formula gives them. Under patch28 padding can leave a resized
  image a row or column above 1600.
- ``qwen_defaults``: ``"hub"`` (preprocessor_config.json: min 3136, max 12845056 pixels) or
  ``"class"`` (transformers class default: max 28*28*1280); ``min_pixels``/``max_pixels`` override.
- LLaVA-NeXT unpadding: the reference writes round(); the cited processor code truncates after
  rounding to 7 decimals, ``int(round(x, 7))``. The code is followed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

from omnifuse.errors import TokenRuleError
from omnifuse.processing.tiles import best_canvas, canvas_label, rescale_longest_edge

__all__ = ["RULES", "TokenCount", "TokenOptions", "TokenRule", "TokenRuleError", "audio_tokens", "image_tokens",
           "options_read", "video_tokens"]

_READ = "2025"  # date the sources were read (reference/token_rules.md)
_REFERENCE = "reference/token_rules.md"


_CHOICES = {
    "detail": ("high", "low", "auto"),
    "media_resolution": (None, "low", "medium", "high", "unspecified"),
    "openai_multiplier_rounding": ("ceil", "floor", "round"),
    "gemini_image_rule": ("tiles768", "crop_unit", "flat258"),
    "gemini_video_rule": ("per_frame", "per_second_263"),
    "gemini_audio_rule": ("per_second_32", "per_second_25"),
    "claude_rule": ("area750", "patch28"),
    "qwen_defaults": ("hub", "class"),
}


@dataclass(frozen=True)
class TokenOptions:
    """Per-request settings; each model honours the fields named in its ``TokenRule.options``.
    Defaults are the documented readings (see the module docstring); bad values raise at construction."""

    detail: str = "high"  # OpenAI tile models; "auto" counts as high
    max_pixels: int | None = None  # Qwen2-VL / 2.5-VL overrides
    min_pixels: int | None = None
    pan_and_scan: bool = False  # Gemma 3
    media_resolution: str | None = None  # Gemini; None = the model's default
    openai_multiplier_rounding: str = "ceil"
    gemini_image_rule: str = "tiles768"
    gemini_video_rule: str = "per_frame"
    gemini_audio_rule: str = "per_second_32"
    claude_rule: str = "area750"
    qwen_defaults: str = "hub"

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TokenRuleError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_pixels", "min_pixels"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise TokenRuleError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise TokenRuleError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if not isinstance(self.pan_and_scan, bool):
            raise TokenRuleError(f"pan_and_scan must be True or False, got {self.pan_and_scan!r}")


@dataclass(frozen=True)
class TokenCount:
    context_tokens: int  # positions in the language model's context
    cross_states_prefill: int = 0  # encoder states cross-attention turns into K/V at prefill
    cross_states_decode: int = 0  # of those, the states decode tokens attend to
    note: str = ""  # short human explanation
    crops: int = 1  # crops the encoder runs (tiles, padding tiles, global views), all frames together
    frames: int = 1  # images behind the count (video frames sent as images)


@dataclass(frozen=True)
class TokenRule:
    model: str
    source: str
    date: str
    fusion: str  # "early" or "cross"
    image: Callable[[int, int, TokenOptions], TokenCount] | None
    audio: Callable[[float, TokenOptions], TokenCount] | None  # seconds
    video: Callable[[float, float, int, int, TokenOptions], TokenCount] | None  # seconds, fps, width, height
    context_window: int | None
    options: tuple[str, ...]  # every field its rules read (see ``_reads``)


# --- small arithmetic ---------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise: 54.00000000001 from a product that is exactly 54 stays 54."""
    return math.ceil(x - 1e-9)


def _round_half_up(x: float | Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _reads(*names: str):
    """Marks a rule with the ``TokenOptions`` fields it reads. The mark sits beside the code that
    reads them and is the one list of them: ``TokenRule.options`` and ``options_read`` (which tells
    the planner that a setting does not apply) are derived from it."""
    def mark(rule):
        rule.options = names
        return rule
    return mark


def _read_by(rule) -> tuple[str, ...]:
    return getattr(rule, "options", ())  # unmarked (or absent): the rule reads no option


# --- OpenAI: platform.openai.com/docs/guides/images-vision#calculating-costs ----------------------

_OPENAI_SOURCE = f"platform.openai.com/docs/guides/images-vision#calculating-costs; {_REFERENCE} §1"


def _fit_long_side(width: int, height: int, limit: int) -> tuple[int, int]:
    """Shrink (never enlarge) so the long side is at most ``limit``; the other side is floored."""
    long, short = max(width, height), min(width, height)
    if long <= limit:
        return width, height
    short = max(1, short * limit // long)
    return (limit, short) if width >= height else (short, limit)


def _fit_short_side(width: int, height: int, limit: int) -> tuple[int, int]:
    """Shrink (never enlarge) so the short side is at most ``limit``; the other side is floored."""
    long, short = max(width, height), min(width, height)
    if short <= limit:
        return width, height
    long = long * limit // short
    return (long, limit) if width >= height else (limit, long)


def _openai_tiles(base: int, tile: int):
    """Tile rule: fit in 2048x2048, shrink the short side to 768, n 512-px tiles -> base + n*tile.
    Scaled sides are floored to whole pixels (the doc shows only exact cases)."""
    @_reads("detail")
    def rule(width: int, height: int, options: TokenOptions) -> TokenCount:
        if options.detail == "low":
            return TokenCount(base, note=f"detail low -> base {base}")
        w, h = _fit_short_side(*_fit_long_side(width, height, 2048), 768)
        n = _cdiv(w, 512) * _cdiv(h, 512)
        return TokenCount(base + n * tile, note=f"{width}x{height} -> {w}x{h} -> {n} tiles x {tile} + {base}")
    return rule


def _patch32_count(width: int, height: int, budget: int = 1536) -> int:
    """Patch rule: 32-px patches; above ``budget`` shrink so a whole number of patches fits."""
    raw = _cdiv(width, 32) * _cdiv(height, 32)
    if raw <= budget:
        return raw
    r = math.sqrt(32 * 32 * budget / (width * height))
    wp, hp = width * r / 32, height * r / 32
    r *= min(math.floor(wp) / wp, math.floor(hp) / hp)
    return _ceil(width * r / 32) * _ceil(height * r / 32)


_ROUNDING = {"ceil": math.ceil, "floor": math.floor, "round": _round_half_up}


def _openai_patches(multiplier: str):
    factor = Fraction(multiplier)  # exact: 100 * 1.62 must not ceil to 163

    @_reads("openai_multiplier_rounding")
    def rule(width: int, height: int, options: TokenOptions) -> TokenCount:
        n = _patch32_count(width, height)
        tokens = _ROUNDING[options.openai_multiplier_rounding](n * factor)
        return TokenCount(tokens, note=f"{width}x{height} -> {n} patches x {multiplier} "
                                       f"({options.openai_multiplier_rounding})")
    return rule


# --- Gemini: ai.google.dev/gemini-api/docs/{tokens,image-understanding,video-understanding,audio,
#     media-resolution} -----------------------------------------------------------------------------

_GEMINI_SOURCE = ("ai.google.dev/gemini-api/docs/tokens, /image-understanding, /video-understanding, /audio, "
                  f"/media-resolution; googleapis/python-genai#1349; {_REFERENCE} §2")
_GEMINI_25_IMAGE = {"low": 64, "medium": 256, "high": 2048, "unspecified": 2048}  # 256 + Pan&Scan ~ 2048
_GEMINI_20_FRAME = {"low": 66}  # video page: 258 per frame, 66 at LOW
_GEMINI_25_FRAME = {"low": 64}  # 2.5 table: 256 per frame, 64 at LOW
_GEMINI_AUDIO_RATE = {"per_second_32": 32, "per_second_25": 25}


@_reads("gemini_image_rule")  # 2.0 has no media_resolution levels for images
def _gemini_2_0_image(width: int, height: int, options: TokenOptions) -> TokenCount:
    """258 if both sides <= 384 px; otherwise 258 per 768-px tile, n by reading A or B."""
    rule = options.gemini_image_rule
    if rule == "flat258":
        return TokenCount(258, note=f"{width}x{height} -> 258 (flat258)")
    if max(width, height) <= 384:
        return TokenCount(258, note=f"{width}x{height} -> 258 (both sides <= 384)")
    unit = 768 if rule == "tiles768" else min(max(2 * min(width, height) // 3, 256), 768)
    n = _cdiv(width, unit) * _cdiv(height, unit)
    return TokenCount(258 * n, note=f"{width}x{height} -> {n} tiles of {unit} px x 258 ({rule})")


@_reads("gemini_image_rule", "media_resolution")
def _gemini_2_5_image(width: int, height: int, options: TokenOptions) -> TokenCount:
    if options.gemini_image_rule == "flat258":
        return TokenCount(258, note=f"{width}x{height} -> 258 (flat258, observed)")
    level = options.media_resolution or "unspecified"
    tokens = _GEMINI_25_IMAGE[level]
    detail = "256 + Pan&Scan, documented as ~2048" if tokens == 2048 else f"{tokens} per image"
    return TokenCount(tokens, note=f"media_resolution {level}: {detail}")


@_reads("gemini_audio_rule")
def _gemini_audio(seconds: float, options: TokenOptions) -> TokenCount:
    rate = _GEMINI_AUDIO_RATE[options.gemini_audio_rule]
    return TokenCount(_ceil(rate * seconds), note=f"{seconds:g} s x {rate}/s")


def _gemini_video(frame_tokens: dict[str, int], default_frame: int):
    """Gemini's native video rule; width and height do not change the count."""
    @_reads("gemini_video_rule", "media_resolution", *_read_by(_gemini_audio))
    def rule(seconds: float, fps: float, width: int, height: int, options: TokenOptions) -> TokenCount:
        if options.gemini_video_rule == "per_second_263":
            return TokenCount(_ceil(263 * seconds), note=f"{seconds:g} s x 263/s (tokens page)")
        per_frame = frame_tokens.get(options.media_resolution, default_frame)
        frames = max(1, _round_half_up(seconds * fps))
        audio = _gemini_audio(seconds, options)
        return TokenCount(frames * per_frame + audio.context_tokens,
                          note=f"{frames} frames at {fps:g} fps x {per_frame} + audio {audio.note} "
                               "(+ ~10/s metadata not counted)")
    return rule


# --- Claude: docs.anthropic.com/en/docs/build-with-claude/vision ---------------------------------

_CLAUDE_SOURCE = f"docs.anthropic.com/en/docs/build-with-claude/vision; {_REFERENCE} §3"


# The page's table of the largest sizes that are not resized (1092x1092, 951x1268, 896x1344, 819x1456,
# 784x1568) is the documented limit; its largest area, 784x1568 (~1640 tokens), is the threshold.
_CLAUDE_MAX_AREA = 784 * 1568


def _claude_count(width: int, height: int, rule: str) -> int:
    if rule == "patch28":
        return _cdiv(width, 28) * _cdiv(height, 28)
    return _cdiv(width * height, 750)


@_reads("claude_rule")
def _claude(width: int, height: int, options: TokenOptions) -> TokenCount:
    """Area/750 (or 28-px patches) after the resize-down described in the module docstring."""
    rule = options.claude_rule
    w, h = width, height
    if max(w, h) > 1568 or w * h > _CLAUDE_MAX_AREA:
        area = 750 if rule == "area750" else 28 * 28
        scale = min(1568 / max(w, h), math.sqrt(1600 * area / (w * h)))
        w, h = max(1, math.floor(w * scale + 1e-9)), max(1, math.floor(h * scale + 1e-9))  # 1568.0, not 1567.99...
    tokens = _claude_count(w, h, rule)
    resized = f" -> {w}x{h}" if (w, h) != (width, height) else ""
    return TokenCount(tokens, note=f"{width}x{height}{resized} -> {tokens} ({rule})")


# --- Tiled canvases: Mllama get_optimal_tiled_canvas, Llama 4 get_best_fit (processing/tiles.py) ---

_MLLAMA_SOURCE = ("transformers models/mllama/{configuration,image_processing,processing}_mllama.py; "
                  f"vLLM model_executor/models/mllama.py; {_REFERENCE} §4")


def _mllama(width: int, height: int, options: TokenOptions) -> TokenCount:
    """Tiles of 560 px (max 4); (560/14)**2 + 1 CLS = 1601 cross-attention states per tile. The
    processor pads every image to 4 tiles, which are all encoded and cached at prefill; the padding
    is masked, so decode attends to the real tiles' states only."""
    rows, cols = best_canvas(width, height, 560, 4)
    n = rows * cols
    return TokenCount(1, cross_states_prefill=1601 * 4, cross_states_decode=1601 * n, crops=4,
                      note=f"{width}x{height} -> {canvas_label(rows, cols)} tiles x 1601 states attended at decode; "
                           "padded to 4 tiles, 6404 states encoded and cached at prefill; 1 <|image|> token")


_LLAMA4_SOURCE = ("transformers models/llama4/image_processing_llama4.py (get_best_fit), processing_llama4.py; "
                  f"vLLM mllama4.py; {_REFERENCE} §7")


def _llama4(width: int, height: int, options: TokenOptions) -> TokenCount:
    """Tiles of 336 px (max 16), 144 tokens each, a global tile when n > 1, n separators, +3.
    The canvas choice gives the tile count; images are padded rather than upscaled past 336."""
    rows, cols = best_canvas(width, height, 336, 16)
    n = rows * cols
    tiles = n + 1 if n > 1 else 1
    separators = n if n > 1 else 0
    tokens = 144 * tiles + separators + 3
    return TokenCount(tokens, crops=tiles,
                      note=f"{width}x{height} -> {canvas_label(rows, cols)} tiles{' + global' if n > 1 else ''} "
                           f"x 144 + {separators} separators + 3")


# --- LLaVA: transformers llava_next/processing_llava_next.py, image_processing_utils ---------------

_LLAVA_SOURCE = f"transformers models/llava/processing_llava.py; vLLM llava.py; {_REFERENCE} §5"
_LLAVA_NEXT_SOURCE = ("transformers models/llava_next/processing_llava_next.py (_get_number_of_features), "
                      f"image_processing_utils.select_best_resolution; vLLM llava_next.py; {_REFERENCE} §5")
_LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (height, width)


def _llava_1_5(width: int, height: int, options: TokenOptions) -> TokenCount:
    return TokenCount(576, note="336 px CLIP ViT-L/14 -> 24x24 = 576 (any size)")


def _select_best_resolution(width: int, height: int) -> tuple[int, int]:
    """(height, width) pinpoint with the largest effective resolution, then the least waste."""
    best, best_key = None, None
    for ph, pw in _LLAVA_NEXT_PINPOINTS:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(pw * ph - effective))
        if best_key is None or key > best_key:
            best, best_key = (ph, pw), key
    return best


def _llava_next(width: int, height: int, options: TokenOptions) -> TokenCount:
    """anyres: grid features unpadded to the image's aspect ratio, one newline per row, + 576 base."""
    ph, pw = _select_best_resolution(width, height)
    ch, cw = 24 * (ph // 336), 24 * (pw // 336)
    if width / height > cw / ch:
        ch -= 2 * ((ch - int(round(height * (cw / width), 7))) // 2)
    else:
        cw -= 2 * ((cw - int(round(width * (ch / height), 7))) // 2)
    tokens = ch * cw + ch + 576
    return TokenCount(tokens, crops=1 + (ph // 336) * (pw // 336),
                      note=f"{width}x{height} -> grid {pw}x{ph} -> {cw}x{ch} features + {ch} newlines + 576")


# --- Qwen2-VL / Qwen2.5-VL: transformers qwen2_vl/image_processing_qwen2_vl.py (smart_resize) ------

_QWEN_SOURCE = ("transformers models/qwen2_vl/{image_processing,video_processing,processing}_qwen2_vl.py; "
                f"vLLM qwen2_vl.py; {_REFERENCE} §6")
_QWEN_IMAGE_PIXELS = {"hub": (3136, 12845056), "class": (3136, 28 * 28 * 1280)}  # (min, max)
_QWEN_VIDEO_PIXELS = (128 * 28 * 28, 768 * 28 * 28)  # Qwen2VLVideoProcessor.size


def _smart_resize(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(width, height): sides multiples of ``factor``, area within [min_pixels, max_pixels]."""
    if max(width, height) / min(width, height) > 200:
        raise TokenRuleError(f"Qwen rejects aspect ratios above 200, got {width}x{height}")
    if min_pixels > max_pixels:
        raise TokenRuleError(f"min_pixels {min_pixels} exceeds max_pixels {max_pixels}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return w, h


def _pixel_bounds(defaults: tuple[int, int], options: TokenOptions) -> tuple[int, int]:
    return options.min_pixels or defaults[0], options.max_pixels or defaults[1]


@_reads("qwen_defaults", "min_pixels", "max_pixels")
def _qwen_image(width: int, height: int, options: TokenOptions) -> TokenCount:
    """(h/28)*(w/28) merged patches + <|vision_start|>/<|vision_end|>."""
    w, h = _smart_resize(width, height, *_pixel_bounds(_QWEN_IMAGE_PIXELS[options.qwen_defaults], options))
    n = (w // 28) * (h // 28)
    return TokenCount(n + 2, note=f"{width}x{height} -> {w}x{h} -> {n} + 2 start/end ({options.qwen_defaults})")


@_reads("min_pixels", "max_pixels")  # frames have their own defaults, not qwen_defaults
def _qwen_video(seconds: float, fps: float, width: int, height: int, options: TokenOptions) -> TokenCount:
    """Frames padded to an even count, 2 frames per temporal patch; one start/end pair per video.
    Frames use the video processor's pixel bounds; min_pixels/max_pixels override them too."""
    frames = max(1, _round_half_up(seconds * fps))
    padded = frames + frames % 2
    w, h = _smart_resize(width, height, *_pixel_bounds(_QWEN_VIDEO_PIXELS, options))
    n = padded // 2 * (w // 28) * (h // 28)
    return TokenCount(n + 2, crops=padded // 2, note=f"{frames} frames (padded {padded}) at {w}x{h} -> {padded // 2} x "
                                  f"{(w // 28) * (h // 28)} + 2 start/end")


# --- Idefics3 / SmolVLM: transformers idefics3/image_processing_idefics3.py ------------------------

_IDEFICS3_SOURCE = ("transformers models/idefics3/{image_processing,processing}_idefics3.py "
                    f"(get_number_of_image_patches); vLLM idefics3.py; {_REFERENCE} §8")


def _idefics3(longest_edge: int, tile: int, per_tile: int):
    """ceil(h/tile) x ceil(w/tile) tiles + 1 global image, ``per_tile`` <image> tokens each. longest_edge
    is 4 tiles for every model here, so every image is split (the processor's unsplit case never arises).
    Wrappers per the processor prompt: <fake_token_around_image><row_r_col_c> per tile, a newline per
    row, and newline, <fake_token_around_image>, <global-img>, <fake_token_around_image> for the global."""
    def rule(width: int, height: int, options: TokenOptions) -> TokenCount:
        w, h = rescale_longest_edge(width, height, longest_edge)
        rows, cols = _cdiv(h, tile), _cdiv(w, tile)
        n = rows * cols + 1
        wrappers = 2 * rows * cols + rows + 4
        return TokenCount(n * per_tile, crops=n,
                          note=f"{width}x{height} -> {w}x{h} -> {canvas_label(rows, cols)} tiles + global x "
                               f"{per_tile} <image> (+ ~{wrappers} wrapper tokens not counted)")
    return rule


# --- Gemma 3: transformers gemma3/{image_processing,processing}_gemma3.py ----------------------------

_GEMMA3_SOURCE = ("transformers models/gemma3/{image_processing,processing}_gemma3.py; vLLM gemma3_mm.py; "
                  f"{_REFERENCE} §9")


def _pan_and_scan_crops(width: int, height: int, min_crop: int = 256, max_crops: int = 4) -> int:
    """Crops along the long side when the aspect ratio is >= 1.2; none if a crop would be < 256 px."""
    long, short = max(width, height), min(width, height)
    if long / short < 1.2:
        return 0
    crops = min(max(min(math.floor(long / short + 0.5), long // min_crop), 2), max_crops)
    return crops if min(_cdiv(long, crops), short) >= min_crop else 0


@_reads("pan_and_scan")
def _gemma3(width: int, height: int, options: TokenOptions) -> TokenCount:
    """256 soft tokens per 896-px image; Pan & Scan adds 256 per crop."""
    if not options.pan_and_scan:
        return TokenCount(256, note="256 soft tokens (+ start/end-of-image wrappers not counted)")
    crops = _pan_and_scan_crops(width, height)
    return TokenCount(256 * (1 + crops), crops=1 + crops, note=f"pan & scan: (1 + {crops} crops) x 256 soft tokens "
                                              "(+ wrappers and a short text preamble not counted)")


# --- Fixed-count resamplers ----------------------------------------------------------------------

_BLIP2_SOURCE = f"transformers models/blip_2/configuration_blip_2.py (num_query_tokens=32); {_REFERENCE} §10"
_FLAMINGO_SOURCE = f"Alayrac et al. 2022; OpenFlamingo/IDEFICS resampler_n_latents=64; {_REFERENCE} §10"


def _blip2(width: int, height: int, options: TokenOptions) -> TokenCount:
    return TokenCount(32, note="32 Q-Former queries prepended as a soft prompt (any size)")


def _flamingo(width: int, height: int, options: TokenOptions) -> TokenCount:
    return TokenCount(1, cross_states_prefill=64, cross_states_decode=64,
                      note="64 Perceiver latents via cross-attention; 1 <image> marker")


_IDEFICS_SOURCE = ("transformers models/idefics/{configuration,processing}_idefics.py; HuggingFaceM4/idefics-9b "
                   "config.json (resampler_n_latents=64)")


def _idefics(width: int, height: int, options: TokenOptions) -> TokenCount:
    return TokenCount(3, cross_states_prefill=64, cross_states_decode=64,
                      note="64 perceiver latents via cross-attention (any size); <fake_token_around_image><image>"
                           "<fake_token_around_image> in the context (one marker fewer right after another image)")


def _flamingo_video(seconds: float, fps: float, width: int, height: int, options: TokenOptions) -> TokenCount:
    return TokenCount(1, cross_states_prefill=64, cross_states_decode=64,
                      note="a whole video -> 64 Perceiver latents; 1 <image> marker")


# --- Registry --------------------------------------------------------------------------------------

def _entry(model, source, image, context_window, fusion="early", audio=None, video=None) -> TokenRule:
    options = tuple(dict.fromkeys(name for f in (image, audio, video) for name in _read_by(f)))
    return TokenRule(model, source, _READ, fusion, image, audio, video, context_window, options)


RULES: dict[str, TokenRule] = {r.model: r for r in (
    # context windows: OpenAI model pages (gpt-4o 128k, gpt-4.1 1,047,576, o1 200k)
    _entry("gpt-4o", _OPENAI_SOURCE, _openai_tiles(85, 170), 128_000),
    _entry("gpt-4o-mini", _OPENAI_SOURCE, _openai_tiles(2833, 5667), 128_000),
    _entry("gpt-4.1-mini", _OPENAI_SOURCE, _openai_patches("1.62"), 1_047_576),
    _entry("gpt-4.1-nano", _OPENAI_SOURCE, _openai_patches("2.46"), 1_047_576),
    _entry("o1", _OPENAI_SOURCE, _openai_tiles(75, 150), 200_000),
    # Gemini model pages: 1,048,576 input tokens
    _entry("gemini-2.0-flash", _GEMINI_SOURCE, _gemini_2_0_image, 1_048_576,
           audio=_gemini_audio, video=_gemini_video(_GEMINI_20_FRAME, 258)),
    _entry("gemini-2.5-pro", _GEMINI_SOURCE, _gemini_2_5_image, 1_048_576,
           audio=_gemini_audio, video=_gemini_video(_GEMINI_25_FRAME, 256)),
    _entry("claude-3.5-sonnet", _CLAUDE_SOURCE, _claude, 200_000),
    # Llama 3.2 Vision: 128k context (model card)
    _entry("llama-3.2-11b-vision", _MLLAMA_SOURCE, _mllama, 131_072, fusion="cross"),
    _entry("llama-3.2-90b-vision", _MLLAMA_SOURCE, _mllama, 131_072, fusion="cross"),
    # llava-1.5-7b and llava-v1.6-vicuna-7b: Vicuna-7B, 4096 (the Mistral-7B variant of LLaVA-NeXT has 32768)
    _entry("llava-1.5-7b", _LLAVA_SOURCE, _llava_1_5, 4096),
    _entry("llava-next-7b", _LLAVA_NEXT_SOURCE, _llava_next, 4096),
    # hub config.json max_position_embeddings: Qwen2-VL-7B 32768, Qwen2.5-VL-7B 128000
    _entry("qwen2-vl-7b", _QWEN_SOURCE, _qwen_image, 32_768, video=_qwen_video),
    _entry("qwen2.5-vl-7b", _QWEN_SOURCE, _qwen_image, 128_000, video=_qwen_video),
    # hub config.json max_position_embeddings: Scout 10485760, Maverick 1048576
    _entry("llama-4-scout", _LLAMA4_SOURCE, _llama4, 10_485_760),
    _entry("llama-4-maverick", _LLAMA4_SOURCE, _llama4, 1_048_576),
    # Idefics3-8B: context length not read from its hub config; SmolVLM blog posts: 256M 8k, Instruct (2B) 16k
    _entry("idefics3-8b", _IDEFICS3_SOURCE, _idefics3(1456, 364, 169), None),
    _entry("smolvlm-256m", _IDEFICS3_SOURCE, _idefics3(2048, 512, 64), 8192),
    _entry("smolvlm-instruct", _IDEFICS3_SOURCE, _idefics3(1536, 384, 81), 16_384),
    _entry("gemma-3-27b", _GEMMA3_SOURCE, _gemma3, 131_072),  # 128k (model card)
    _entry("blip-2", _BLIP2_SOURCE, _blip2, 2048),  # blip2-opt-2.7b: OPT max_position_embeddings 2048
    _entry("idefics-9b", _IDEFICS_SOURCE, _idefics, 2048, fusion="cross"),  # max_position_embeddings 2048
    _entry("flamingo-80b", _FLAMINGO_SOURCE, _flamingo, None, fusion="cross", video=_flamingo_video),  # unpublished
)}

# Native video rules sample at these rates when the caller gives no fps: the Gemini API samples 1 fps;
# qwen-vl-utils FPS = 2.0; Flamingo's videos were sampled at 1 fps (Alayrac et al. 2022).
_NATIVE_VIDEO_FPS = {"gemini-2.0-flash": 1.0, "gemini-2.5-pro": 1.0, "qwen2-vl-7b": 2.0, "qwen2.5-vl-7b": 2.0,
                     "flamingo-80b": 1.0}


# --- Public functions ------------------------------------------------------------------------------

def _lookup(model: str) -> TokenRule:
    if model not in RULES:
        raise TokenRuleError(f"unknown model {model!r}; known: {', '.join(sorted(RULES))}")
    return RULES[model]


def _check_size(width, height) -> None:
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value) or value <= 0:
            raise TokenRuleError(f"{name} must be a positive integer, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise TokenRuleError(f"{name} must be a positive number, got {value!r}")


def options_read(model: str, kinds: Iterable[str]) -> frozenset[str]:
    """The ``TokenOptions`` fields that ``model``'s rules for ``kinds`` ("image", "audio", "video") read."""
    rule = _lookup(model)
    counters = {"image": rule.image, "audio": rule.audio,
                "video": rule.video or rule.image}  # no native video rule: frames are counted as images
    return frozenset(name for kind in kinds for name in _read_by(counters[kind]))


def image_tokens(model: str, width: int, height: int, options: TokenOptions = TokenOptions()) -> TokenCount:
    rule = _lookup(model)
    _check_size(width, height)
    if rule.image is None:
        raise TokenRuleError(f"{model} does not accept images")
    return rule.image(width, height, options)


def audio_tokens(model: str, seconds: float, options: TokenOptions = TokenOptions()) -> TokenCount:
    rule = _lookup(model)
    _check_positive("seconds", seconds)
    if rule.audio is None:
        raise TokenRuleError(f"{model} does not accept audio")
    return rule.audio(seconds, options)


def _native_timing(model: str, seconds: float | None, fps: float | None, frames: int | None) -> tuple[float, float]:
    """(seconds, fps) for a native video rule; a given ``frames`` fixes seconds * fps."""
    if frames is not None and seconds is not None:
        return seconds, frames / seconds
    fps = fps or _NATIVE_VIDEO_FPS[model]
    if frames is not None:
        return frames / fps, fps
    if seconds is None:
        raise TokenRuleError(f"video on {model} needs seconds or frames")
    return seconds, fps


def _frame_count(model: str, seconds: float | None, fps: float | None, frames: int | None) -> int:
    if frames is not None:
        return frames
    if seconds is None or fps is None:
        raise TokenRuleError(f"{model} has no native video rule: give frames, or seconds and fps")
    return max(1, _round_half_up(seconds * fps))


def video_tokens(model: str, seconds: float | None, fps: float | None, width: int, height: int,
                 frames: int | None = None, options: TokenOptions = TokenOptions()) -> TokenCount:
    """A model's native video rule (Gemini, Qwen2-VL/2.5-VL, Flamingo) where it has one; otherwise
    ``frames`` (or round(seconds * fps)) frames, each counted by the image rule. A given ``frames``
    wins over seconds * fps; native rules without fps use the model's sampling rate."""
    rule = _lookup(model)
    _check_size(width, height)
    for name, value in (("seconds", seconds), ("fps", fps)):
        if value is not None:
            _check_positive(name, value)
    if frames is not None and (not _is_int(frames) or frames <= 0):
        raise TokenRuleError(f"frames must be a positive integer, got {frames!r}")
    if rule.video is not None:
        return rule.video(*_native_timing(model, seconds, fps, frames), width, height, options)
    n = _frame_count(model, seconds, fps, frames)
    frame = image_tokens(model, width, height, options)
    return TokenCount(n * frame.context_tokens, cross_states_prefill=n * frame.cross_states_prefill,
                      cross_states_decode=n * frame.cross_states_decode, crops=n * frame.crops, frames=n,
                      note=f"no native video rule: {n} frames counted as images, each {frame.note}")
