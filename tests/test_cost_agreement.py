"""One cost source: ``info``, ``plan --json``, ``generate --json`` and the cache generation allocates
agree on visual tokens, both cross-attention state counts and KV bytes, for every preset.

The two cross-attention counts (planner/costs.py): states encoded and cached at prefill
(Llama 3.2 Vision pads every image to 4 tiles) and states attended at decode (the real tiles of the
images the last prompt token reads; the model's decode cache keeps only these). Full-size presets
go through the processor and the cost functions without weights; the tiny presets, and a tiny
Llama-3.2-Vision-shaped model with padding tiles, really generate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from omnifuse.cli import main
from omnifuse.config import (
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from omnifuse.modalities import build_image_processor
from omnifuse.model import build_model
from omnifuse.pipeline import Pipeline
from omnifuse.planner.arch import from_model_config
from omnifuse.planner.costs import (
    image_cost,
    images_seen_at_decode,
    model_info,
    request_cost,
)
from omnifuse.planner.plan import PlanModel, Workload, plan
from omnifuse.presets import get_preset, preset_names
from omnifuse.processing.text import load_tokenizer

PRESETS = preset_names()
TINY = [n for n in PRESETS if n.startswith("tiny-")]
# 20x20 and 50x20 fill one and two of the tiny tiled models' 4 tiles, so padding tiles show there.
SIZES = [(500, 500), (1200, 300), (64, 64), (20, 20), (50, 20)]
TEXT_TOKENS, OUTPUT_TOKENS = 9, 3
FP32 = 4

# Llama 3.2 Vision in miniature: the Mllama encoder on 28 px tiles, every image padded to 4 tiles,
# the reference's cross-attention span (latest placeholder group) and blind-token rule.
TINY_MLLAMA = ModelConfig(
    name="tiny-mllama",
    vision=VisionConfig(type="mllama", image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_global_layers=1,
                        num_heads=2, intermediate_size=64, intermediate_layers=(0,), max_num_tiles=4,
                        feature_select="full", pre_norm=False),
    image=ImageConfig(mode="tiles", image_size=28, max_tiles=4, overview=False, pad_tiles=True),
    fusion=FusionConfig(type="cross", cross_attention_every=2, cross_attention_span="latest",
                        text_before_media="attend_all"),
    decoder=DecoderConfig(vocab_size=260, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                          intermediate_size=128, max_position=512),
    text=TextConfig(tokenizer="bytes"),
)
GENERATED = {**{n: get_preset(n) for n in TINY}, "tiny-mllama": TINY_MLLAMA}


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def run_json(capsys, *argv) -> dict:
    assert main([str(a) for a in argv] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def info_of(capsys, name: str, config: ModelConfig, size: tuple[int, int]) -> dict:
    """``omnifuse info --image WxH --json`` (presets through the CLI, the tiny Mllama through
    model_info, the function the CLI calls)."""
    if name in PRESETS:
        return run_json(capsys, "info", "--preset", name, "--image", f"{size[0]}x{size[1]}")
    return model_info(config, image_size=size)


def plan_of(capsys, name: str, config: ModelConfig, size: tuple[int, int], text_tokens: int, output_tokens: int,
            images: int = 1) -> dict:
    """``omnifuse plan --json`` with an fp32 cache, as info and the CPU pipeline count."""
    if name in PRESETS:
        return run_json(capsys, "plan", "--model", name, *["--image", f"{size[0]}x{size[1]}"] * images,
                        "--text-tokens", text_tokens, "--output-tokens", output_tokens, "--kv-dtype", "fp32",
                        "--dtype", "fp32")
    model = PlanModel(name, None, config, from_model_config(config))
    return plan(model, Workload(images=(size,) * images, text_tokens=text_tokens, output_tokens=output_tokens),
                dtype="fp32", kv_dtype="fp32")


def per_image(info: dict) -> dict:
    """The figures every source must give for one image: (visual tokens, context tokens, prefill
    states, decode states)."""
    return {"visual": info["visual_tokens_per_image"], "context": info["context_tokens_per_image"],
            "prefill": info.get("cross_attention_states_prefill", 0),
            "decode": info.get("cross_attention_states_decode", 0)}


def expected_cache(info: dict, positions: int, prefill: int, decode: int) -> dict:
    per_state = info.get("cross_attention_kv_bytes_per_state", 0)
    bounded = 0  # bounded layers (sliding, chunked) hold rings of their span, at most the context
    if "attention_spans" in info:
        layers, spans = info["attention_layers"], info["attention_spans"]
        per_slot = info["kv_cache_bytes_bounded_layers"] // sum(layers[k] * spans[k] for k in spans)
        bounded = sum(layers[k] * min(positions, spans[k]) * per_slot for k in spans)
    return {"self_attention": positions * info["kv_cache_bytes_per_token"] + bounded,
            "cross_attention_prefill": prefill * per_state, "cross_attention_decode": decode * per_state}


def check_plan(p: dict, info: dict, images: int, decode_images: int, text_tokens: int, output_tokens: int) -> None:
    one = per_image(info)
    for i in p["inputs"]:
        assert (i["tokens"], i["cross_attention_states_prefill"], i["cross_attention_states_decode"]) == \
            (one["context"], one["prefill"], one["decode"])
        # the encoder's output: in the context (early), or encoded at prefill (cross)
        # (plus the span's marker tokens: Llama 4's tile separators)
        assert (i["cross_attention_states_prefill"] or i["tokens"]) in (one["visual"], one["context"])
    prefill, decode = images * one["prefill"], decode_images * one["decode"]
    assert (p["cross_attention_states_prefill"], p["cross_attention_states_decode"]) == (prefill, decode)
    assert p["context_tokens"] == text_tokens + images * one["context"]
    cache = expected_cache(info, p["context_tokens"] + output_tokens, prefill, decode)
    assert p["kv_cache_bytes_by_kind"] == cache
    assert p["kv_cache_bytes"] == cache["self_attention"] + cache["cross_attention_decode"]


# --- every preset, no weights ------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", PRESETS + ["tiny-mllama"])
def test_info_plan_and_processor_agree(capsys, name, size):
    config = GENERATED.get(name) or get_preset(name)
    info = info_of(capsys, name, config, size)
    one = per_image(info)
    # The processor: what the pipeline hands the model.
    processor = build_image_processor(config)
    image = processor(noise(*size))
    assert image.num_tokens == one["visual"] and image.pixel_values.shape[0] == info["crops"]
    if config.image.mode == "tiles":
        assert image.tiles == (info["tile_canvas"]["rows"], info["tile_canvas"]["cols"])
    cross = config.fusion.type == "cross"
    markers = 0
    if config.text.image_span and not cross:  # Llama 4: image start / end, tile separators, <|image|>
        from omnifuse.processing.prompt import MediaShape, span_marker_tokens

        markers = span_marker_tokens(config.text.image_span, MediaShape(image.num_tokens, image.tiles))
    assert one["context"] == (1 if cross else one["visual"] + markers)
    assert one["prefill"] == (one["visual"] if cross else 0)
    if cross and config.image.pad_tiles:  # padding tiles are encoded and cached, never attended
        per_tile = one["visual"] // config.image.max_tiles
        assert one["decode"] == image.tiles[0] * image.tiles[1] * per_tile
    else:
        assert one["decode"] == one["prefill"]
    check_plan(plan_of(capsys, name, config, size, TEXT_TOKENS, OUTPUT_TOKENS), info, 1, 1, TEXT_TOKENS, OUTPUT_TOKENS)
    # generate's estimate, without weights: the cost functions the pipeline calls, on the processed image.
    cost = request_cost(config, TEXT_TOKENS + one["context"] + OUTPUT_TOKENS,
                        [image_cost(config, *image.original_size, processor)], FP32)
    assert (cost.visual_tokens, cost.cross_attention_states_prefill, cost.cross_attention_states_decode) == \
        (one["visual"], one["prefill"], one["decode"])
    assert cost.kv_cache_bytes.as_dict() == expected_cache(info, TEXT_TOKENS + one["context"] + OUTPUT_TOKENS,
                                                           one["prefill"], one["decode"])


# --- tiny models: generation and the cache it allocates ------------------------------------------


@pytest.fixture(scope="module")
def pipelines():
    out = {n: Pipeline.from_preset(n, seed=0) for n in TINY}
    torch.manual_seed(0)
    out["tiny-mllama"] = Pipeline(build_model(TINY_MLLAMA), load_tokenizer(TINY_MLLAMA.text))
    return out


def allocated(cache) -> dict[str, int]:
    """Bytes of the cache generation allocated, by kind (the cross part is what decode keeps)."""
    return {"self_attention": cache.self_attn.nbytes,
            "cross_attention_decode": cache.cross.nbytes if cache.cross is not None else 0}


def generate_and_capture(monkeypatch, pipe: Pipeline, prompt: str, images: list, max_new_tokens: int):
    """Generate without stop tokens (so the output fills the cache generation sized) and return the
    result, the cache generation allocated and the states the connector produced."""
    caches, encoded = [], []
    new_cache = pipe.model.new_cache

    def capture(*args, **kwargs):
        caches.append(new_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(pipe.model, "new_cache", capture)
    hook = pipe.model.connector.register_forward_hook(lambda m, i, o: encoded.append(o.numel() // o.shape[-1]))
    try:
        result = pipe.generate(prompt, images, pipe.sampling(max_new_tokens=max_new_tokens, stop_token_ids=()))
    finally:
        hook.remove()
    assert result.finish_reason == "length" and len(caches) == 1
    return result, caches[0], sum(encoded)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(GENERATED))
def test_generation_and_its_cache_agree_with_info_and_plan(capsys, monkeypatch, pipelines, name, size):
    pipe, config = pipelines[name], GENERATED[name]
    info = info_of(capsys, name, config, size)
    one = per_image(info)
    result, cache, encoded = generate_and_capture(monkeypatch, pipe, "<image> what is it", [noise(*size)],
                                                  OUTPUT_TOKENS)
    assert (result.visual_tokens, result.cross_attention_states_prefill, result.cross_attention_states_decode) == \
        (one["visual"], one["prefill"], one["decode"])
    assert encoded == one["visual"]  # the encoder and connector produced what every source counts
    positions = result.prompt_tokens + OUTPUT_TOKENS
    kinds = expected_cache(info, positions, one["prefill"], one["decode"])
    assert result.kv_cache_bytes_by_kind == kinds
    assert result.kv_cache_bytes == kinds["self_attention"] + kinds["cross_attention_decode"]
    assert allocated(cache) == {k: kinds[k] for k in ("self_attention", "cross_attention_decode")}
    text_tokens = result.prompt_tokens - one["context"]
    check_plan(plan_of(capsys, name, config, size, text_tokens, OUTPUT_TOKENS), info, 1, 1, text_tokens,
               OUTPUT_TOKENS)


@pytest.mark.parametrize("name", list(GENERATED))
def test_two_images_agree_and_decode_reads_the_latest_group(capsys, monkeypatch, pipelines, name):
    """Two images apart in the prompt: with Llama 3.2 Vision's ``latest`` span the last prompt token,
    and so every decode token, reads only the second; the decode cache holds only its states."""
    pipe, config = pipelines[name], GENERATED[name]
    size = (50, 20)
    info = info_of(capsys, name, config, size)
    one = per_image(info)
    result, cache, encoded = generate_and_capture(monkeypatch, pipe, "<image> left, <image> right?",
                                                  [noise(*size, 1), noise(*size, 2)], 2)
    latest = config.fusion.cross_attention_span == "latest"
    decode = one["decode"] * (1 if latest else 2)
    assert (result.visual_tokens, result.cross_attention_states_prefill, result.cross_attention_states_decode) == \
        (2 * one["visual"], 2 * one["prefill"], decode)
    assert encoded == 2 * one["visual"]
    kinds = expected_cache(info, result.prompt_tokens + 2, 2 * one["prefill"], decode)
    assert result.kv_cache_bytes_by_kind == kinds
    assert allocated(cache) == {k: kinds[k] for k in ("self_attention", "cross_attention_decode")}
    if not latest:  # plan puts a request's images together before the text: the last token reads all
        text_tokens = result.prompt_tokens - 2 * one["context"]
        check_plan(plan_of(capsys, name, config, size, text_tokens, 2, images=2), info, 2, 2, text_tokens, 2)


@pytest.mark.parametrize("name", TINY)
def test_generate_json_reports_both_cross_attention_counts(capsys, tmp_path, name):
    path = tmp_path / "image.png"
    noise(50, 20).save(path)
    info = info_of(capsys, name, get_preset(name), (50, 20))
    one = per_image(info)
    out = run_json(capsys, "generate", "--preset", name, "--image", path, "--prompt", "what is it",
                   "--max-new-tokens", OUTPUT_TOKENS)
    assert (out["visual_tokens"], out["cross_attention_states_prefill"], out["cross_attention_states_decode"]) == \
        (one["visual"], one["prefill"], one["decode"])
    kinds = expected_cache(info, out["prompt_tokens"] + out["completion_tokens"], one["prefill"], one["decode"])
    assert out["kv_cache_bytes_by_kind"] == kinds
    assert out["kv_cache_bytes"] == kinds["self_attention"] + kinds["cross_attention_decode"]


# --- the case that disagreed: Llama 3.2 11B Vision, one 500 x 500 image -----------------------------


def test_llama_3_2_11b_vision_500x500_prefill_and_decode_states(capsys):
    """Padded to 4 tiles of 1601 states: 6404 encoded and cached at prefill, 1601 (the one real
    tile) attended at decode, in info, plan and generate's estimate. No weights are built."""
    name, size = "llama-3.2-11b-vision", (500, 500)
    config = get_preset(name)
    per_state = 2 * 8 * 8 * 128 * FP32  # K and V, 8 cross-attention layers x 8 KV heads x 128, fp32
    info = run_json(capsys, "info", "--preset", name, "--image", "500x500")
    assert (info["cross_attention_states_prefill"], info["cross_attention_states_decode"]) == (6404, 1601)
    assert info["cross_attention_kv_bytes_per_state"] == per_state
    assert (info["cross_attention_kv_bytes_prefill"], info["cross_attention_kv_bytes_decode"]) == \
        (6404 * per_state, 1601 * per_state)
    p = run_json(capsys, "plan", "--model", name, "--image", "500x500", "--text-tokens", "10", "--output-tokens", "5",
                 "--kv-dtype", "fp32")
    assert (p["inputs"][0]["cross_attention_states_prefill"], p["inputs"][0]["cross_attention_states_decode"]) == \
        (6404, 1601)
    assert (p["cross_attention_states_prefill"], p["cross_attention_states_decode"]) == (6404, 1601)
    assert p["kv_cache_bytes_by_kind"]["cross_attention_prefill"] == 6404 * per_state
    assert p["kv_cache_bytes_by_kind"]["cross_attention_decode"] == 1601 * per_state
    assert p["kv_cache_bytes"] == (11 + 5) * 2 * 32 * 8 * 128 * FP32 + 1601 * per_state
    # generate: the processor's output and the pipeline's cost functions.
    processor = build_image_processor(config)
    image = processor(noise(*size))
    assert (image.num_tokens, image.pixel_values.shape[0], image.tiles) == (6404, 4, (1, 1))
    tokenizer_image_id = 128256  # <|image|>
    prompt = [128000, tokenizer_image_id, 128000, 3923, 374, 420, 30]  # <bos><|image|><bos>What is this?
    seen = images_seen_at_decode(config, prompt, tokenizer_image_id, 1)
    cost = request_cost(config, len(prompt) + 5, [image_cost(config, *image.original_size, processor)], FP32, seen)
    assert (cost.visual_tokens, cost.cross_attention_states_prefill, cost.cross_attention_states_decode) == \
        (6404, 6404, 1601)
    assert cost.kv_cache_bytes.cross_attention_prefill == 6404 * per_state
    assert cost.kv_cache_bytes.decode == (len(prompt) + 5) * 2 * 32 * 8 * 128 * FP32 + 1601 * per_state


# --- one tile canvas list and choice --------------------------------------------------------------


def test_one_canvas_list_and_choice():
    """The processor, the Mllama encoder's aspect-ratio embeddings and the planner's Llama 3.2 rule
    use one list of (rows, cols) canvases and one best-fit choice."""
    from omnifuse.encoders.mllama_vision import (
        supported_aspect_ratios as encoder_ratios,
    )
    from omnifuse.planner.tokens import image_tokens
    from omnifuse.processing.image import aspect_ratio_id
    from omnifuse.processing.tiles import (
        best_canvas,
        canvas_label,
        supported_aspect_ratios,
    )

    for max_tiles in (1, 2, 4, 8):
        canvases = supported_aspect_ratios(max_tiles)
        assert encoder_ratios(max_tiles) == canvases
        assert [aspect_ratio_id(r, c, max_tiles) for r, c in canvases] == list(range(1, len(canvases) + 1))
    processor = build_image_processor(get_preset("llama-3.2-11b-vision"))
    for width, height in [*SIZES, (1000, 300), (300, 1000), (2000, 2000), (1, 5000)]:
        rows, cols = processor.canvas(width, height)
        assert best_canvas(width, height, 560, 4) == (rows, cols)
        count = image_tokens("llama-3.2-11b-vision", width, height)
        assert count.cross_states_decode == rows * cols * 1601
        assert f"-> {canvas_label(rows, cols)} tiles" in count.note
    assert processor.canvas(1200, 300) == (1, 3) and canvas_label(1, 3) == "3x1"  # rows, cols; printed WxH
