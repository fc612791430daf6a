"""Planner token rules (omnifuse.planner.tokens): vendor examples from reference/token_rules.md, the
documented alternatives, boundary cases, errors, and cross-checks against transformers' helpers."""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys
import types

import pytest

from omnifuse.planner.tokens import (
    RULES,
    TokenOptions,
    TokenRuleError,
    audio_tokens,
    image_tokens,
    options_read,
    video_tokens,
)

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "gemini-2.0-flash", "gemini-2.5-pro",
          "claude-3.5-sonnet", "llama-3.2-11b-vision", "llama-3.2-90b-vision", "llava-1.5-7b", "llava-next-7b",
          "qwen2-vl-7b", "qwen2.5-vl-7b", "llama-4-scout", "llama-4-maverick", "idefics3-8b", "smolvlm-256m",
          "smolvlm-instruct", "gemma-3-27b", "blip-2", "idefics-9b", "flamingo-80b"]

# (width, height): tiny, thin both ways, tile boundaries +-1, photo and screen sizes, huge.
SIZES = [(1, 1), (13, 13), (29, 57), (7, 300), (300, 7), (64, 128), (128, 64), (224, 224), (336, 336),
         (337, 335), (500, 500), (560, 560), (561, 559), (640, 480), (480, 640), (672, 672), (800, 600),
         (1000, 10), (10, 1000), (1000, 500), (1024, 1024), (1092, 1092), (1120, 560), (333, 777),
         (1280, 720), (1920, 1080), (1080, 1920), (2048, 4096), (3000, 1000), (4000, 3000), (5000, 50)]


def tokens(model: str, width: int, height: int, **options) -> int:
    return image_tokens(model, width, height, TokenOptions(**options)).context_tokens


# --- registry ------------------------------------------------------------------------------------

def test_registry_holds_exactly_the_published_models():
    assert sorted(RULES) == sorted(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_every_rule_names_its_source_date_fusion_and_real_options(model):
    rule = RULES[model]
    option_names = {f.name for f in dataclasses.fields(TokenOptions)}
    assert rule.model == model and rule.source and rule.date == "2025"
    assert rule.fusion in ("early", "cross")
    assert set(rule.options) <= option_names
    assert rule.image is not None


class _RecordingOptions:
    """The default TokenOptions, remembering which fields a rule reads."""

    def __init__(self):
        self.options, self.read = TokenOptions(), set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self.options, name)


@pytest.mark.parametrize("model", MODELS)
def test_each_rule_declares_exactly_the_options_it_reads(model):
    """The declarations are what `plan` uses to say a setting does not apply, so they must match the code."""
    calls = {"image": lambda o: image_tokens(model, 1000, 500, o),
             "audio": lambda o: audio_tokens(model, 10, o),
             "video": lambda o: video_tokens(model, 10, 1, 640, 480, options=o)}
    for kind, call in calls.items():
        if kind == "audio" and RULES[model].audio is None:
            continue
        recorder = _RecordingOptions()
        call(recorder)
        assert recorder.read == options_read(model, [kind]), kind


def test_options_read_depend_on_the_medium():
    assert options_read("gemini-2.0-flash", ["image"]) == {"gemini_image_rule"}  # 2.0 images have no levels
    assert "media_resolution" in options_read("gemini-2.0-flash", ["video"])
    assert "media_resolution" in options_read("gemini-2.5-pro", ["image"])
    assert options_read("qwen2-vl-7b", ["video"]) == {"min_pixels", "max_pixels"}  # frames: their own defaults
    assert options_read("gpt-4o", ["video"]) == {"detail"}  # frames counted as images
    assert options_read("llava-1.5-7b", ["image", "video"]) == set()
    assert set(RULES["gemini-2.0-flash"].options) == options_read("gemini-2.0-flash", ["image", "audio", "video"])


def test_context_windows():
    windows = {"llava-1.5-7b": 4096, "gpt-4o": 128_000, "gemini-2.0-flash": 1_048_576, "claude-3.5-sonnet": 200_000,
               "llama-3.2-11b-vision": 131_072, "qwen2-vl-7b": 32_768, "llama-4-scout": 10_485_760}
    assert {m: RULES[m].context_window for m in windows} == windows


def test_cross_attention_models():
    assert {m for m, r in RULES.items() if r.fusion == "cross"} == {
        "llama-3.2-11b-vision", "llama-3.2-90b-vision", "idefics-9b", "flamingo-80b"}


def test_module_does_not_import_torch():
    code = "import sys, omnifuse.planner.tokens; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- OpenAI ----------------------------------------------------------------------------------------

def test_openai_tile_rule_doc_examples():
    assert tokens("gpt-4o", 1024, 1024) == 765  # -> 768x768 -> 4 tiles
    assert tokens("gpt-4o", 2048, 4096) == 1105  # -> 1024x2048 -> 768x1536 -> 6 tiles
    assert image_tokens("gpt-4o", 1024, 1024).note == "1024x1024 -> 768x768 -> 4 tiles x 170 + 85"


@pytest.mark.parametrize("size", [(1, 1), (1024, 1024), (4096, 8192)])
def test_openai_low_detail_is_the_base(size):
    assert tokens("gpt-4o", *size, detail="low") == 85
    assert tokens("gpt-4o-mini", *size, detail="low") == 2833
    assert tokens("o1", *size, detail="low") == 75


def test_openai_base_and_tile_by_model_and_auto_is_high():
    assert tokens("gpt-4o-mini", 1024, 1024) == 2833 + 4 * 5667
    assert tokens("o1", 1024, 1024) == 75 + 4 * 150
    assert tokens("gpt-4o", 1024, 1024, detail="auto") == 765


def test_openai_small_image_is_never_upscaled():
    # Measured billing: 128x64 is one tile (an upscale to a 768 short side would give 6).
    assert tokens("gpt-4o", 128, 64) == 85 + 170


def test_openai_patch_rule_doc_examples():
    mini = image_tokens("gpt-4.1-mini", 1024, 1024)
    assert "1024 patches" in mini.note and mini.context_tokens == math.ceil(1024 * 1.62)
    assert "1452 patches" in image_tokens("gpt-4.1-mini", 1800, 2400).note  # -> 1056x1408 -> 33 x 44


def test_openai_patch_rule_epsilon():
    # 2048x4096 scales to exactly 27 x 54 patches; float error must not make it 27 x 55 = 1485.
    count = image_tokens("gpt-4.1-nano", 2048, 4096)
    assert "1458 patches" in count.note
    assert count.context_tokens == math.ceil(1458 * 2.46)


def test_openai_multiplier_rounding_alternatives():
    # 1024 * 1.62 = 1658.88; 1024 * 2.46 = 2519.04; 100 * 1.62 is exactly 162 (no float ceil to 163).
    assert [tokens("gpt-4.1-mini", 1024, 1024, openai_multiplier_rounding=r) for r in ("ceil", "floor", "round")] \
        == [1659, 1658, 1659]
    assert tokens("gpt-4.1-nano", 1024, 1024, openai_multiplier_rounding="round") == 2519
    assert tokens("gpt-4.1-mini", 320, 320) == 162


def test_patch_models_ignore_detail():
    assert tokens("gpt-4.1-mini", 1024, 1024, detail="low") == 1659


# --- Gemini ----------------------------------------------------------------------------------------

def test_gemini_small_image_is_258():
    assert tokens("gemini-2.0-flash", 384, 384) == 258
    assert tokens("gemini-2.0-flash", 100, 384, gemini_image_rule="crop_unit") == 258


def test_gemini_readings_disagree_on_mid_size_images():
    assert tokens("gemini-2.0-flash", 512, 512) == 258  # A: one 768 tile
    assert tokens("gemini-2.0-flash", 512, 512, gemini_image_rule="crop_unit") == 1032  # B: unit 341 -> 2x2
    assert tokens("gemini-2.0-flash", 512, 512, gemini_image_rule="flat258") == 258


def test_gemini_reading_a_tiles():
    assert tokens("gemini-2.0-flash", 3840, 2160) == 5 * 3 * 258
    assert tokens("gemini-2.0-flash", 3840, 2160, gemini_image_rule="flat258") == 258


def test_gemini_2_0_images_ignore_media_resolution():
    assert tokens("gemini-2.0-flash", 1024, 1024, media_resolution="low") == tokens("gemini-2.0-flash", 1024, 1024)


def test_gemini_2_5_media_resolution():
    assert tokens("gemini-2.5-pro", 1024, 1024) == 2048  # UNSPECIFIED: 256 + Pan&Scan (~2048)
    levels = {lvl: tokens("gemini-2.5-pro", 1024, 1024, media_resolution=lvl)
              for lvl in ("low", "medium", "high", "unspecified")}
    assert levels == {"low": 64, "medium": 256, "high": 2048, "unspecified": 2048}
    assert tokens("gemini-2.5-pro", 3840, 2160, gemini_image_rule="flat258") == 258  # observed (python-genai#1349)


def test_gemini_audio():
    assert audio_tokens("gemini-2.0-flash", 60).context_tokens == 1920
    assert audio_tokens("gemini-2.5-pro", 60, TokenOptions(gemini_audio_rule="per_second_25")).context_tokens == 1500
    assert audio_tokens("gemini-2.0-flash", 0.5).context_tokens == 16


def gemini_video(model: str, seconds: float, fps: float | None = None, **options) -> int:
    return video_tokens(model, seconds, fps, 640, 480, options=TokenOptions(**options)).context_tokens


def test_gemini_video_worked_examples():
    assert gemini_video("gemini-2.0-flash", 60) == (258 + 32) * 60 == 17_400
    assert gemini_video("gemini-2.0-flash", 60, media_resolution="low") == (66 + 32) * 60 == 5880
    assert gemini_video("gemini-2.0-flash", 60, gemini_video_rule="per_second_263") == 15_780


def test_gemini_2_5_video_frames_follow_media_resolution():
    assert gemini_video("gemini-2.5-pro", 60) == (256 + 32) * 60
    assert gemini_video("gemini-2.5-pro", 60, media_resolution="low") == (64 + 32) * 60


def test_gemini_video_fps_and_frames():
    assert gemini_video("gemini-2.0-flash", 60, fps=2) == 120 * 258 + 60 * 32
    given = video_tokens("gemini-2.0-flash", None, None, 640, 480, frames=30)  # 30 frames at the 1 fps default
    assert given.context_tokens == 30 * (258 + 32)
    spread = video_tokens("gemini-2.0-flash", 60, 5, 640, 480, frames=30)  # frames win: 0.5 fps over 60 s
    assert spread.context_tokens == 30 * 258 + 60 * 32


# --- Claude ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side, expected", [(200, 54), (1000, 1334), (1092, 1590)])
def test_claude_doc_examples(side, expected):
    assert tokens("claude-3.5-sonnet", side, side) == expected


def test_claude_resizes_large_images():
    big = image_tokens("claude-3.5-sonnet", 4000, 3000)
    assert 1590 <= big.context_tokens <= 1600 and "-> 1264x948" in big.note
    # Long edge over 1568 with few tokens: 2000x500 -> 1568x392 -> ceil(614656 / 750).
    assert tokens("claude-3.5-sonnet", 2000, 500) == 820


@pytest.mark.parametrize("width, height", [(1092, 1092), (951, 1268), (896, 1344), (819, 1456), (784, 1568)])
def test_claude_table_sizes_are_not_resized(width, height):
    assert tokens("claude-3.5-sonnet", width, height) == -(-width * height // 750)
    assert tokens("claude-3.5-sonnet", height, width) == -(-width * height // 750)


def test_claude_resized_long_edge_lands_on_the_limit():
    # 3000 * (1568 / 3000) is 1567.9999... in floating point; the long edge must still be 1568.
    assert tokens("claude-3.5-sonnet", 1000, 3000) == -(-522 * 1568 // 750)
    assert tokens("claude-3.5-sonnet", 3000, 1000) == -(-522 * 1568 // 750)


def test_claude_patch28_alternative():
    assert tokens("claude-3.5-sonnet", 1092, 1092, claude_rule="patch28") == 39 * 39
    assert tokens("claude-3.5-sonnet", 200, 200, claude_rule="patch28") == 8 * 8
    assert tokens("claude-3.5-sonnet", 784, 1568, claude_rule="patch28") == 28 * 56


# --- Llama 3.2 Vision (Mllama) ---------------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama-3.2-11b-vision", "llama-3.2-90b-vision"])
def test_mllama_tiles_are_cross_states(model):
    largest = image_tokens(model, 2000, 2000)
    assert (largest.context_tokens, largest.cross_states_decode, largest.crops) == (1, 6404, 4)  # max
    assert image_tokens(model, 500, 500).cross_states_decode == 1601  # fits one tile, no upscale beyond it
    assert image_tokens(model, 1000, 300).cross_states_decode == 2 * 1601  # 1x2: smallest upscale >= 1 (1.12)
    # Every image is padded to 4 tiles, all encoded and cached at prefill.
    for size in ((2000, 2000), (500, 500), (1000, 300)):
        small = image_tokens(model, *size)
        assert (small.cross_states_prefill, small.crops) == (6404, 4)


# --- LLaVA -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (336, 336), (4000, 3000)])
def test_llava_1_5_is_576(size):
    assert tokens("llava-1.5-7b", *size) == 576


def test_llava_next_maximum_and_unpadding():
    assert tokens("llava-next-7b", 672, 672) == 48 * 48 + 48 + 576 == 2928
    assert tokens("llava-next-7b", 1000, 500) == 48 * 24 + 24 + 576  # 336x672 grid, nothing unpadded
    assert max(tokens("llava-next-7b", w, h) for w, h in SIZES) == 2928


# --- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
def test_qwen_image(model):
    assert tokens(model, 448, 448) == 16 * 16 + 2
    assert tokens(model, 1000, 800, max_pixels=28 * 28 * 256) == 14 * 17 + 2  # shrink: 476x392
    assert tokens(model, 56, 56, min_pixels=28 * 28 * 16) == 4 * 4 + 2  # grow: 112x112


def test_qwen_defaults_hub_vs_class():
    assert tokens("qwen2-vl-7b", 4000, 3000) == 143 * 107 + 2  # hub max 12,845,056: rounded, not shrunk
    assert tokens("qwen2-vl-7b", 4000, 3000, qwen_defaults="class") == 41 * 30 + 2  # at most 1280


@pytest.mark.parametrize("model", ["qwen2-vl-7b", "qwen2.5-vl-7b"])
def test_qwen_video(model):
    # Reference: 20 frames at 448x448 -> 10 x 16 x 16 = 2560, plus one start/end pair per video.
    assert video_tokens(model, None, None, 448, 448, frames=20).context_tokens == 2560 + 2
    assert video_tokens(model, 10, None, 448, 448).context_tokens == 2560 + 2  # 2 fps default
    assert video_tokens(model, None, None, 448, 448, frames=21).context_tokens == 11 * 256 + 2  # padded to 22


# --- Llama 4 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, n", [((100, 100), 1), ((400, 400), 4), ((336, 672), 2), ((5000, 5000), 16)])
def test_llama4_formula(size, n):
    expected = (n + (n > 1)) * 144 + (n if n > 1 else 0) + 3
    assert tokens("llama-4-scout", *size) == tokens("llama-4-maverick", *size) == expected


def test_llama4_single_tile_is_147():
    assert tokens("llama-4-scout", 336, 336) == 144 + 3


# --- Idefics3 / SmolVLM ----------------------------------------------------------------------------

# By hand (long edge rescaled up or down, short side truncated then rounded up to even):
#   idefics3-8b 1000x1000 -> 1456x1456 -> 4x4 tiles of 364 + global = 17 x 169 = 2873
#   smolvlm-256m 640x480 -> 2048x1536 -> 4x3 tiles of 512 + global = 13 x 64 = 832
#   smolvlm-instruct 1000x333 -> 1536 x int(511.49) = 511 -> 512 -> 4x2 tiles of 384 + global = 9 x 81 = 729
#   smolvlm-instruct 50x100 (upscaled) -> 768x1536 -> 2x4 tiles + global = 9 x 81 = 729
@pytest.mark.parametrize("model, size, expected", [
    ("idefics3-8b", (1000, 1000), 2873),
    ("smolvlm-256m", (640, 480), 832),
    ("smolvlm-instruct", (1000, 333), 729),
    ("smolvlm-instruct", (50, 100), 729),
])
def test_idefics3_smolvlm_by_hand(model, size, expected):
    count = image_tokens(model, *size)
    assert count.context_tokens == expected and "wrapper tokens not counted" in count.note


# --- Gemma 3, BLIP-2, Flamingo ---------------------------------------------------------------------

def test_gemma3_pan_and_scan():
    assert tokens("gemma-3-27b", 1200, 400) == 256
    assert tokens("gemma-3-27b", 1200, 400, pan_and_scan=True) == (1 + 3) * 256  # ratio 3 -> 3 crops of 400
    assert tokens("gemma-3-27b", 800, 700, pan_and_scan=True) == 256  # ratio 1.14 < 1.2
    assert tokens("gemma-3-27b", 600, 200, pan_and_scan=True) == 256  # 3 crops of 200 px < 256: skipped


def test_fixed_count_resamplers():
    assert image_tokens("blip-2", 4000, 3000).context_tokens == 32
    image = image_tokens("flamingo-80b", 50, 50)
    assert (image.context_tokens, image.cross_states_prefill, image.cross_states_decode) == (1, 64, 64)
    clip = video_tokens("flamingo-80b", 30, None, 640, 480)
    assert (clip.context_tokens, clip.cross_states_decode) == (1, 64)  # one resampled set per video


# --- video through the image rule ------------------------------------------------------------------

def test_video_frames_counted_as_images():
    clip = video_tokens("gpt-4o", 10, 1, 1024, 1024)
    assert clip.context_tokens == 10 * 765 and "frames counted as images" in clip.note
    assert video_tokens("gpt-4o", 10.2, 1, 1024, 1024).context_tokens == 10 * 765
    cross = video_tokens("llama-3.2-11b-vision", None, None, 2000, 2000, frames=3)
    assert (cross.context_tokens, cross.cross_states_prefill, cross.cross_states_decode) == (3, 3 * 6404, 3 * 6404)


# --- errors ----------------------------------------------------------------------------------------

def test_unknown_model_lists_known_names():
    with pytest.raises(TokenRuleError, match="unknown model 'gpt-5'.*gpt-4o.*qwen2-vl-7b"):
        image_tokens("gpt-5", 100, 100)


@pytest.mark.parametrize("width, height, bad", [(0, 10, "width"), (10, -5, "height"), (1.5, 10, "width"),
                                                (True, 10, "width")])
def test_impossible_sizes(width, height, bad):
    with pytest.raises(TokenRuleError, match=f"{bad} must be a positive integer"):
        image_tokens("gpt-4o", width, height)
    with pytest.raises(TokenRuleError, match=bad):
        video_tokens("qwen2-vl-7b", 1, 1, width, height)


@pytest.mark.parametrize("seconds, fps, frames, words", [
    (0, 1, None, "seconds must be a positive number, got 0"),
    (10, -1, None, "fps must be a positive number, got -1"),
    (10, float("nan"), None, "fps"),
    (None, None, 0, "frames must be a positive integer, got 0"),
    (None, None, None, "needs seconds or frames"),
])
def test_bad_video_timing(seconds, fps, frames, words):
    with pytest.raises(TokenRuleError, match=words):
        video_tokens("gemini-2.0-flash", seconds, fps, 640, 480, frames=frames)


def test_video_on_image_model_needs_a_frame_count():
    with pytest.raises(TokenRuleError, match="give frames, or seconds and fps"):
        video_tokens("gpt-4o", 10, None, 640, 480)


@pytest.mark.parametrize("model", ["gpt-4o", "claude-3.5-sonnet", "qwen2-vl-7b", "flamingo-80b"])
def test_audio_on_a_model_without_audio(model):
    with pytest.raises(TokenRuleError, match=f"^{model} does not accept audio$"):
        audio_tokens(model, 10)


def test_audio_needs_positive_seconds():
    with pytest.raises(TokenRuleError, match="seconds"):
        audio_tokens("gemini-2.0-flash", -1)


@pytest.mark.parametrize("kwargs, words", [
    ({"detail": "medium"}, "detail"),
    ({"media_resolution": "ultra_high"}, "media_resolution"),
    ({"openai_multiplier_rounding": "up"}, "openai_multiplier_rounding"),
    ({"gemini_image_rule": "tiles512"}, "gemini_image_rule"),
    ({"gemini_video_rule": "per_second_300"}, "gemini_video_rule"),
    ({"gemini_audio_rule": "per_second_30"}, "gemini_audio_rule"),
    ({"claude_rule": "patch32"}, "claude_rule"),
    ({"qwen_defaults": "vllm"}, "qwen_defaults"),
    ({"max_pixels": 0}, "max_pixels"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels 5000 exceeds max_pixels 4000"),
    ({"pan_and_scan": "yes"}, "pan_and_scan"),
])
def test_bad_option_values(kwargs, words):
    with pytest.raises(TokenRuleError, match=words):
        TokenOptions(**kwargs)


def test_qwen_rejects_extreme_aspect_ratio():
    with pytest.raises(TokenRuleError, match="aspect ratios above 200"):
        image_tokens("qwen2-vl-7b", 3000, 10)


def test_min_pixels_above_class_max_is_reported():
    with pytest.raises(TokenRuleError, match="exceeds max_pixels"):
        image_tokens("qwen2-vl-7b", 500, 500, TokenOptions(min_pixels=2_000_000, qwen_defaults="class"))


# --- cross-checks against transformers' pure-python helpers ----------------------------------------

@pytest.fixture(scope="module")
def hf_smart_resize():
    return pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize


@pytest.mark.parametrize("width, height", SIZES)
def test_qwen_matches_transformers_smart_resize(hf_smart_resize, width, height):
    for defaults, (lo, hi) in {"hub": (3136, 12_845_056), "class": (3136, 28 * 28 * 1280)}.items():
        h, w = hf_smart_resize(height, width, factor=28, min_pixels=lo, max_pixels=hi)
        assert tokens("qwen2-vl-7b", width, height, qwen_defaults=defaults) == (h // 28) * (w // 28) + 2
    h, w = hf_smart_resize(height, width, factor=28, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    assert video_tokens("qwen2.5-vl-7b", None, None, width, height, frames=4).context_tokens == \
        2 * (h // 28) * (w // 28) + 2


@pytest.fixture(scope="module")
def hf_llava_next_features():
    processing = pytest.importorskip("transformers.models.llava_next.processing_llava_next")
    cls = processing.LlavaNextProcessor
    fake = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        patch_size=14, num_additional_image_tokens=1)
    fake._get_unpadded_features = functools.partial(cls._get_unpadded_features, fake)
    # "default" feature selection drops the CLS token, as LlavaNextProcessor does.
    return lambda width, height: cls._get_number_of_features(fake, height, width, 336, 336) - 1


@pytest.mark.parametrize("width, height", SIZES)
def test_llava_next_matches_transformers(hf_llava_next_features, width, height):
    assert tokens("llava-next-7b", width, height) == hf_llava_next_features(width, height)


@pytest.fixture(scope="module")
def hf_tiled_canvas():
    return pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama").get_optimal_tiled_canvas


@pytest.mark.parametrize("width, height", SIZES)
def test_mllama_matches_transformers_canvas(hf_tiled_canvas, width, height):
    canvas_h, canvas_w = hf_tiled_canvas(height, width, 4, 560)
    n = (canvas_h // 560) * (canvas_w // 560)
    assert image_tokens("llama-3.2-11b-vision", width, height).cross_states_decode == 1601 * n


@pytest.mark.parametrize("width, height", SIZES)
def test_llama4_matches_transformers_canvas(hf_tiled_canvas, width, height):
    # Llama 4's get_best_fit (needs torchvision, absent here) applies the same selection to the same
    # candidates (every grid with at most 16 tiles), so Mllama's helper at 16 x 336 is its reference.
    canvas_h, canvas_w = hf_tiled_canvas(height, width, 16, 336)
    n = (canvas_h // 336) * (canvas_w // 336)
    assert tokens("llama-4-scout", width, height) == (n + (n > 1)) * 144 + (n if n > 1 else 0) + 3


@pytest.fixture(scope="module")
def hf_idefics3_patches():
    module = pytest.importorskip("transformers.models.idefics3.image_processing_pil_idefics3")
    return {model: module.Idefics3ImageProcessorPil(size={"longest_edge": edge}, max_image_size={"longest_edge": tile})
            for model, edge, tile in [("idefics3-8b", 1456, 364), ("smolvlm-instruct", 1536, 384),
                                      ("smolvlm-256m", 2048, 512)]}


@pytest.mark.parametrize("width, height", SIZES)
def test_idefics3_matches_transformers(hf_idefics3_patches, width, height):
    per_tile = {"idefics3-8b": 169, "smolvlm-instruct": 81, "smolvlm-256m": 64}
    for model, processor in hf_idefics3_patches.items():
        patches, _, _ = processor.get_number_of_image_patches(height, width, {})
        assert tokens(model, width, height) == patches * per_tile[model]


@pytest.fixture(scope="module")
def hf_pan_and_scan():
    np = pytest.importorskip("numpy")
    module = pytest.importorskip("transformers.models.gemma3.image_processing_pil_gemma3")
    processor = module.Gemma3ImageProcessorPil()
    # A zero-stride view: the helper only slices, so no pixels are allocated.
    return lambda width, height: len(processor.pan_and_scan(np.broadcast_to(np.uint8(0), (3, height, width)),
                                                            256, 4, 1.2))


@pytest.mark.parametrize("width, height", SIZES)
def test_gemma3_matches_transformers_pan_and_scan(hf_pan_and_scan, width, height):
    assert tokens("gemma-3-27b", width, height, pan_and_scan=True) == 256 * (1 + hf_pan_and_scan(width, height))
