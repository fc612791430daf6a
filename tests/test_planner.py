"""The cost planner: architecture arithmetic, predicted vs measured, costs, CLI and errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from omnifuse.cli import main
from omnifuse.planner.arch import from_model_config
from omnifuse.planner.costs import active_parameters, count_parameters, kv_bytes_per_token
from omnifuse.planner.measure import measure_request
from omnifuse.planner.plan import Workload, plan, resolve_model
from omnifuse.planner.published import PUBLISHED
from omnifuse.planner.resources import load_hardware, load_prices, local_cpu
from omnifuse.presets import get_preset, preset_names

TINY = [n for n in preset_names() if n.startswith("tiny-")]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """The measured local CPU is cached per test run, never in the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# --- architecture arithmetic -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-early", "tiny-cross", "tiny-flamingo", "llava-1.5-7b"])
def test_parameter_formula_matches_the_built_model(name):
    config = get_preset(name)
    predicted = from_model_config(config).parameters()
    built = count_parameters(config)
    assert predicted["connector"] == built["connector"]
    # The formula leaves out the ViT's pre-norm and the patch bias flag (a few hundred parameters).
    assert predicted["total"] == pytest.approx(built["total"], rel=1e-3)


@pytest.mark.parametrize("name, total, experts", [("llama-4-scout", 109e9, 16), ("llama-4-maverick", 400e9, 128)])
def test_the_llama_4_presets_have_the_published_sizes(name, total, experts):
    """Scout 17B active / 109B total, Maverick 17B active / 400B total (Meta's model cards); the
    "17B active" is the text model's. The preset built on the meta device counts the same."""
    config = get_preset(name)
    params = from_model_config(config).parameters()
    built = count_parameters(config)
    assert params["total"] == pytest.approx(built["total"], rel=1e-6)
    assert params["total"] == pytest.approx(total, rel=0.01)
    text_active = params["active"] - params["vision_encoder"] - params["connector"]
    assert text_active == pytest.approx(17e9, rel=0.02)
    active = active_parameters(config, built["total"])
    assert active == pytest.approx(params["active"], rel=1e-6)
    planned = plan(resolve_model(name), Workload(text_tokens=10))["parameters"]  # `omnifuse plan`'s figure
    assert planned == {"total": built["total"], "active": active}
    assert config.decoder.num_experts == experts and sum(s.attention == "chunked" for s in config.layer_specs) == 36


@pytest.mark.parametrize("name, total, active", [
    ("qwen2-vl-7b", 8.29e9, None),
    ("qwen2.5-vl-7b", 8.29e9, None),
    ("idefics3-8b", 8.46e9, None),
    ("smolvlm-256m", 256e6, None),
    ("smolvlm-instruct", 2.25e9, None),
    ("gemma-3-27b", 27.4e9, None),
    ("blip-2", 3.74e9, None),
    ("idefics-9b", 8.93e9, None),
])
def test_published_architectures_have_their_published_sizes(name, total, active):
    params = PUBLISHED[name].parameters()
    assert params["total"] == pytest.approx(total, rel=0.02)
    if active is not None:  # "17B active" counts the text model; ours adds the vision tower (~0.9B)
        assert params["active"] == pytest.approx(active, rel=0.08)
        assert params["active"] < params["total"] / 5


def test_sliding_window_caps_the_kv_cache():
    gemma = PUBLISHED["gemma-3-27b"].decoder
    per_token_layer = 2 * gemma.kv_heads * gemma.head_dim * 2
    # 62 layers: 10 global (every 6th) grow with the context, 52 stop at the 1024-token window.
    assert gemma.kv_bytes(1000, 2) == 62 * 1000 * per_token_layer
    assert gemma.kv_bytes(10_000, 2) == (10 * 10_000 + 52 * 1024) * per_token_layer


def test_kv_cache_matches_the_model_estimate():
    config = get_preset("tiny-early")
    assert from_model_config(config).decoder.kv_bytes(100, 4) == 100 * kv_bytes_per_token(config, 4)


# --- predicted vs measured -------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("sizes", [[(64, 64)], [(100, 40), (30, 90)]])
def test_prediction_equals_measurement_for_tiny_presets(name, sizes):
    model = resolve_model(name)
    workload = Workload(images=tuple(sizes), text_tokens=12, output_tokens=5)
    predicted = plan(model, workload, dtype="fp32", kv_dtype="fp32")
    measured = measure_request(get_preset(name), sizes, 12, 5, repeats=1)
    visual = [i["tokens"] if i["cross_attention_states_prefill"] == 0 else i["cross_attention_states_prefill"]
              for i in predicted["inputs"]]
    assert visual == measured["visual_tokens"]
    assert predicted["context_tokens"] == measured["context_tokens"]
    assert predicted["kv_cache_bytes"] == measured["kv_cache_bytes"]
    assert predicted["prefill_flops"] == pytest.approx(measured["prefill_flops"], rel=0.02)
    assert predicted["decode_flops_per_token"] == pytest.approx(measured["decode_flops_per_token"], rel=0.02)


@pytest.mark.parametrize("path", ["configs/models/arena-early.yaml", "configs/models/arena-cross.yaml"])
def test_prediction_equals_measurement_for_arena_models(path):
    """Model config files too: a convolutional stem and connector positions."""
    from pathlib import Path

    from omnifuse.config import load_config

    path = str(Path(__file__).resolve().parents[1] / path)
    model = resolve_model(path)
    predicted = plan(model, Workload(images=((64, 64),), text_tokens=9, output_tokens=4), dtype="fp32",
                     kv_dtype="fp32")
    measured = measure_request(load_config(path), [(64, 64)], 9, 4, repeats=1)
    assert predicted["kv_cache_bytes"] == measured["kv_cache_bytes"]
    assert predicted["prefill_flops"] == pytest.approx(measured["prefill_flops"], rel=0.02)
    assert predicted["decode_flops_per_token"] == pytest.approx(measured["decode_flops_per_token"], rel=0.02)


def test_measure_counts_attention_flops_on_cpu():
    """torch's flop registry has no CPU attention kernel; the planner's counter adds it, so a
    longer context costs more per decoded token."""
    config = get_preset("tiny-early")
    short = measure_request(config, [(64, 64)], 4, 1, repeats=1)["decode_flops_per_token"]
    long = measure_request(config, [(64, 64), (64, 64)], 4, 1, repeats=1)["decode_flops_per_token"]
    d = config.decoder
    assert long - short == 4 * d.num_heads * d.head_dim * d.num_layers * 64


@pytest.mark.parametrize("name", TINY)
def test_measure_cli_agrees(name, capsys):
    assert main(["plan", "--preset", name, "--measure", "--image", "80x48", "--text-tokens", "10",
                 "--output-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["agree"] is True
    assert [r[3] for r in out["rows"][:3]] == ["equal"] * 3


def test_measure_refuses_full_size_presets(capsys):
    assert main(["plan", "--preset", "llava-1.5-7b", "--measure", "--image", "336x336", "--text-tokens", "5"]) == 1
    assert "float32" in capsys.readouterr().err


# --- costs -----------------------------------------------------------------------------------

def test_cross_attention_keeps_visual_states_out_of_the_context():
    early = plan(resolve_model("tiny-early"), Workload(images=((64, 64),), text_tokens=10))
    cross = plan(resolve_model("tiny-cross"), Workload(images=((64, 64),), text_tokens=10))
    assert early["context_tokens"] == 10 + 64 and early["cross_attention_states_prefill"] == 0
    assert early["cross_attention_states_decode"] == 0
    assert cross["context_tokens"] == 10 + 1 and cross["cross_attention_states_decode"] == 4 * 17
    assert cross["cross_attention_states_prefill"] == 4 * 17  # tiny-cross pads no tiles


def test_decode_cost_of_cross_attention_grows_with_states_not_context():
    model = resolve_model("tiny-cross")
    one = plan(model, Workload(images=((32, 32),), text_tokens=10))
    four = plan(model, Workload(images=((32, 32),) * 4, text_tokens=10))
    assert four["context_tokens"] == one["context_tokens"] + 3
    assert four["cross_attention_states_decode"] == 4 * one["cross_attention_states_decode"]
    assert four["decode_flops_per_token"] > one["decode_flops_per_token"]


def test_serving_and_dollars():
    prices = load_prices()
    h100 = load_hardware()["h100"]
    work = Workload(images=((1024, 1024),), text_tokens=200, output_tokens=300, requests_per_day=100_000,
                    concurrency=16)
    p = plan(resolve_model("llava-1.5-7b"), work, accelerator=h100, prices=prices)
    assert p["serving"]["gpus_per_replica"] == 1  # 13.5 GB of bf16 weights + 16 caches fit one H100
    assert p["serving"]["gpus"] >= 1
    assert p["cost"]["self_hosted_usd_per_day"] == pytest.approx(p["serving"]["gpus"] * 24 * 2.99)
    assert p["cost"]["api_usd_per_day"] is None  # no vendor API for LLaVA in the price file
    big = plan(resolve_model("llama-4-maverick"), Workload(images=((672, 672),), text_tokens=10), accelerator=h100)
    assert big["serving"]["gpus_per_replica"] >= 6  # 800 GB of bf16 weights


def test_api_cost_uses_the_price_file():
    prices = load_prices()
    work = Workload(images=((1024, 1024),), text_tokens=100, output_tokens=50, requests_per_day=1000)
    p = plan(resolve_model("gpt-4o"), work, prices=prices)
    assert p["parameters"] is None and p["kv_cache_bytes"] is None  # closed: tokens and API cost only
    expected = (765 + 100) * 2.50 / 1e6 + 50 * 10.00 / 1e6
    assert p["cost"]["api_usd_per_request"] == pytest.approx(expected)
    assert p["cost"]["api_usd_per_day"] == pytest.approx(1000 * expected)


def test_assumed_architecture_is_marked_estimated():
    model = resolve_model("gpt-4o", assume="llava-1.5-7b")
    p = plan(model, Workload(images=((1024, 1024),), text_tokens=10))
    assert p["estimated"] is True
    assert p["context_tokens"] == 775  # the vendor's token rule still counts the tokens
    assert p["kv_cache_bytes"] == 775 * 2 * 32 * 4096 * 2


def test_compare_applies_an_assumed_architecture_to_closed_models_only(capsys):
    assert main(["plan", "--compare", "gpt-4o,llava-1.5-7b", "--image", "336x336", "--assume-architecture",
                 "llava-1.5-7b", "--json"]) == 0
    gpt, llava = json.loads(capsys.readouterr().out)
    assert gpt["estimated"] is True and gpt["kv_cache_bytes"] == 255 * 2 * 32 * 4096 * 2  # 85 + 170: one tile
    assert llava["estimated"] is False


def test_moe_decode_reads_only_routed_experts_at_batch_one():
    h100 = load_hardware()["h100"]
    model = resolve_model("llama-4-scout")
    one = plan(model, Workload(text_tokens=100, output_tokens=10, concurrency=1), accelerator=h100)
    many = plan(model, Workload(text_tokens=100, output_tokens=10, concurrency=64), accelerator=h100)
    # batch 1 reads about the active weights; 64 requests touch nearly every expert
    assert many["latency"]["decode_s_per_token"] > 4 * one["latency"]["decode_s_per_token"]


# --- files and errors ------------------------------------------------------------------------

def test_local_cpu_is_measured_once_and_cached(tmp_path):
    first = local_cpu()
    assert first.tflops["fp32"] > 0 and first.bandwidth_gb_s > 0
    path = tmp_path / "cache" / "omnifuse" / "local_cpu.json"
    data = json.loads(path.read_text())
    data["fp32_gflops"] = 1234.0  # a user's edit is respected
    path.write_text(json.dumps(data))
    assert local_cpu().tflops["fp32"] == pytest.approx(1.234)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-5-ultra", "--image", "10x10"], "unknown model 'gpt-5-ultra'"),
    (["--model", "gpt-4o", "--image", "0x100"], "0x100 is impossible"),
    (["--model", "gpt-4o", "--image=-5x100"], "impossible"),
    (["--model", "llava-1.5-7b", "--image", "10x10", "--gpu", "b200"], "unknown accelerator 'b200'"),
    (["--model", "gpt-4o"], "nothing to plan"),
    (["--model", "gpt-4o", "--image", "10x10x10"], "--image expects WIDTHxHEIGHT"),
    (["--model", "gpt-4o", "--video-seconds", "5", "--video-size", "big"], "--video-size expects WIDTHxHEIGHT"),
    (["--model", "gpt-4o", "--image", "10x10", "--plot", "/no/such/folder/p.png"], "its folder does not exist"),
    (["--model", "gpt-4o", "--image", "10x10", "--rule", "nonsense=1"], "--rule 'nonsense=1'"),
    (["--model", "tiny-cross", "--video-seconds", "inf"], "video-seconds must be a finite number, got inf"),
    (["--model", "tiny-cross", "--video-seconds", "2", "--fps", "nan"], "fps must be a finite number, got nan"),
    (["--compare", "", "--image", "512x512"], "--compare '' names no model"),
    (["--compare", ",", "--image", "512x512"], "--compare ',' names no model"),
    (["--compare", " , ,", "--image", "512x512"], "names no model"),
    (["--compare", "gpt-4o,llava-1.5-7b, gpt-4o", "--image", "512x512"], "--compare names gpt-4o more than once"),
    (["--model", "gpt-4o", "--image", "10x10", "--plot", "p.v2"], "cannot draw .v2 files"),
])
def test_bad_requests_get_one_clear_line(argv, message, capsys):
    assert main(["plan", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_prices_are_named(tmp_path, capsys):
    prices = tmp_path / "prices.yaml"
    prices.write_text("date: '2026-01-01'\napi: {}\ngpu_hour: {}\n")
    assert main(["plan", "--model", "gpt-4o", "--image", "512x512", "--requests-per-day", "10",
                 "--prices", str(prices)]) == 1
    assert "no API price for gpt-4o" in capsys.readouterr().err
    assert main(["plan", "--model", "llava-1.5-7b", "--image", "512x512", "--requests-per-day", "10",
                 "--prices", str(prices)]) == 1
    assert "no $/GPU-hour for 'h100'" in capsys.readouterr().err
    undated = tmp_path / "undated.yaml"
    undated.write_text("api: {}\n")
    assert main(["plan", "--model", "gpt-4o", "--image", "512x512", "--prices", str(undated)]) == 1
    assert "has no date" in capsys.readouterr().err


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("omnifuse: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("text, message", [
    ("h100:\n  memory_gb: lots\n", "lists no accelerators (found 'h100' at the top level); put each entry under"),
    ("accelerators:\n  h100:\n    memory_gb: lots\n",
     "accelerator 'h100': missing tflops, bandwidth_gb_s; memory_gb must be a positive number, got 'lots'"),
    ("accelerators:\n  h100: {tflops: {bf16: fast}, memory_gb: 80, bandwidth_gb_s: -1}\n",
     ("accelerator 'h100': tflops.bf16 must be a positive number, got 'fast'; bandwidth_gb_s must be a positive "
      "number, got -1")),
    ("accelerators:\n  h100: {tflops: 989, memory_gb: 80, bandwidth_gb_s: 3350}\n",
     "accelerator 'h100': tflops must map compute dtypes to peak TFLOP/s"),
    ("accelerators:\n  h100: 80\n", "accelerator 'h100' must be a mapping with tflops, memory_gb, bandwidth_gb_s"),
    ("accelerators: [h100]\n", "accelerators must be a mapping"),
])
def test_malformed_hardware_entries_are_named(tmp_path, capsys, text, message):
    hardware = tmp_path / "hw.yaml"
    hardware.write_text(text)
    assert main(["plan", "--model", "llava-1.5-7b", "--image", "512x512", "--hardware", str(hardware)]) == 1
    assert f"hardware file {hardware}" in (err := _one_error_line(capsys)) and message in err


@pytest.mark.parametrize("text, message", [
    ("api:\n  gpt-4o: {input: cheap, output: 10}\n", "api.gpt-4o: input must be a non-negative number, got 'cheap'"),
    ("api:\n  gpt-4o: {input: 2.5}\n", "api.gpt-4o: missing output"),
    ("api:\n  gpt-4o: 2.5\n", "api.gpt-4o must be a mapping with input, output, got 2.5"),
    ("api:\n  gpt-4o: {input: 2.5, output: 10, audio_input: -1}\n", "audio_input must be a non-negative number"),
    ("api: {}\ngpu_hour:\n  h100: {usd: lots}\n", "gpu_hour.h100: usd must be a non-negative number, got 'lots'"),
    ("api: {}\ngpu_hour:\n  h100: {source: somewhere}\n", "gpu_hour.h100: missing usd"),
    ("api: [gpt-4o]\n", "api must be a mapping"),
])
def test_malformed_price_entries_are_named(tmp_path, capsys, text, message):
    prices = tmp_path / "prices.yaml"
    prices.write_text("date: '2026-01-01'\n" + text)
    assert main(["plan", "--model", "gpt-4o", "--image", "512x512", "--requests-per-day", "10",
                 "--prices", str(prices)]) == 1
    assert f"price file {prices}" in (err := _one_error_line(capsys)) and message in err


def test_free_prices_are_prices(tmp_path, capsys):
    prices = tmp_path / "prices.yaml"
    prices.write_text("date: '2026-01-01'\napi:\n  gpt-4o: {input: 0, output: 0}\n")
    assert main(["plan", "--model", "gpt-4o", "--image", "512x512", "--requests-per-day", "10",
                 "--prices", str(prices), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"]["api_usd_per_day"] == 0


def test_json_has_the_documented_fields(capsys):
    assert main(["plan", "--model", "llama-3.2-11b-vision", "--image", "1024x1024", "--text-tokens", "20",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("model", "inputs", "context_tokens", "cross_attention_states_prefill", "cross_attention_states_decode",
                "kv_cache_bytes", "kv_cache_bytes_by_kind", "prefill_flops", "decode_flops_per_token"):
        assert key in out
    assert set(out["inputs"][0]) >= {"kind", "width", "height", "seconds", "tokens", "cross_attention_states_prefill",
                                     "cross_attention_states_decode"}
    assert out["context_tokens"] == 21 and out["cross_attention_states_decode"] == 4 * 1601  # a 2x2 canvas
    assert out["cross_attention_states_prefill"] == 4 * 1601
    assert set(out["kv_cache_bytes_by_kind"]) == {"self_attention", "cross_attention_prefill", "cross_attention_decode"}


def test_compare_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", "--compare", "gpt-4o,claude-3.5-sonnet,llava-1.5-7b,tiny-cross", "--image", "1024x1024",
                 "--requests-per-day", "1000", "--output-tokens", "100", "--plot", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["model"] for p in out] == ["gpt-4o", "claude-3.5-sonnet", "llava-1.5-7b", "tiny-cross"]
    assert png.stat().st_size > 10_000
    assert main(["plan", "--compare", "gpt-4o,llava-1.5-7b", "--image", "1024x1024"]) == 0
    table = capsys.readouterr().out
    assert "gpt-4o" in table and "llava-1.5-7b" in table


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_prefill_flops_are_twice_the_active_weights_per_token_plus_attention(name):
    """The rule of thumb (Kaplan et al. 2020): a text token costs 2 FLOPs per active decoder weight,
    plus attention over the context."""
    d = PUBLISHED[name].decoder
    tokens = 1000
    embeddings = (d.vocab + d.extra_embeddings) * d.hidden * (1 if d.tied else 2)
    active = d.parameters() - d.inactive_parameters() - embeddings
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    cross_weights = d.cross_layers * (2 * d.hidden * q + 2 * (d.cross_kv_dim or d.hidden) * kv
                                      + 3 * d.hidden * d.intermediate)
    flops = PUBLISHED[name].prefill_flops(tokens, [])
    windowed = d.windowed_layers
    keys = (d.layers - windowed) * tokens + windowed * min(tokens, d.window)  # per query, summed over layers
    attention = 4 * d.heads * d.head_dim * tokens * keys  # FlopCounterMode: the full query x key rectangle
    expected = 2 * tokens * (active - cross_weights) + attention + 2 * d.hidden * d.vocab
    assert flops["total"] == pytest.approx(expected, rel=0.01)


def test_qwen_video_attends_within_each_temporal_slice():
    """Qwen2-VL's encoder attends within each 2-frame slice, so a 4x longer video costs 4x."""
    model = resolve_model("qwen2-vl-7b")
    short = plan(model, Workload(video_seconds=4, fps=2, video_size=(448, 448)))
    long = plan(model, Workload(video_seconds=16, fps=2, video_size=(448, 448)))
    assert long["prefill_flops_by_part"]["encoder"] == pytest.approx(4 * short["prefill_flops_by_part"]["encoder"],
                                                                     rel=0.01)


# --- --compare lists, --plot paths, settings a model ignores -----------------------------------

def test_compare_skips_empty_items(capsys):
    assert main(["plan", "--compare", "gpt-4o,,llava-1.5-7b,", "--image", "512x512", "--json"]) == 0
    assert [p["model"] for p in json.loads(capsys.readouterr().out)] == ["gpt-4o", "llava-1.5-7b"]


def test_plot_without_a_suffix_prints_the_file_it_writes(tmp_path, capsys):
    assert main(["plan", "--model", "gpt-4o", "--image", "512x512", "--plot", str(tmp_path / "myplot")]) == 0
    assert f"plot: {tmp_path / 'myplot.png'}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["myplot.png"]


def test_plot_keeps_a_given_suffix(tmp_path, capsys):
    assert main(["plan", "--model", "gpt-4o", "--image", "512x512", "--plot", str(tmp_path / "plan.svg")]) == 0
    assert f"plot: {tmp_path / 'plan.svg'}" in capsys.readouterr().out
    assert (tmp_path / "plan.svg").read_text().lstrip().startswith("<?xml")


def test_plot_refuses_a_folder_before_any_work(tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    # An unknown model fails only once planning starts: the folder is refused first.
    assert main(["plan", "--model", "gpt-5-ultra", "--image", "512x512", "--plot", str(tmp_path)]) == 1
    assert f"--plot {tmp_path} is a folder" in _one_error_line(capsys)
    assert sorted(tmp_path.iterdir()) == before and not tmp_path.with_suffix(".png").exists()


IGNORED = [
    (["--model", "llava-1.5-7b", "--detail", "low"], "--detail low is ignored by llava-1.5-7b's image rule"),
    (["--model", "llava-1.5-7b", "--detail", "high"], "--detail high is ignored by llava-1.5-7b's image rule"),
    (["--model", "gemini-2.0-flash", "--media-resolution", "low"],
     "--media-resolution low is ignored by gemini-2.0-flash's image rule"),
    (["--model", "gpt-4o", "--pan-and-scan"], "--pan-and-scan is ignored by gpt-4o's image rule"),
    (["--model", "claude-3.5-sonnet", "--max-pixels", "1000000"],
     "--max-pixels 1000000 is ignored by claude-3.5-sonnet's image rule"),
    (["--model", "gemma-3-27b", "--min-pixels", "1000"], "--min-pixels 1000 is ignored by gemma-3-27b's image rule"),
    (["--model", "gpt-4o", "--rule", "claude_rule=patch28"],
     "--rule claude_rule=patch28 is ignored by gpt-4o's image rule"),
    (["--model", "qwen2-vl-7b", "--video-seconds", "4", "--rule", "qwen_defaults=class"],
     "--rule qwen_defaults=class is ignored by qwen2-vl-7b's video rule"),
    (["--model", "tiny-cross", "--detail", "low"],
     "--detail low is ignored by tiny-cross: omnifuse models count tokens with their own image processor"),
]


@pytest.mark.parametrize("argv, note", IGNORED)
def test_a_setting_the_model_ignores_is_noted_in_the_table_and_json(argv, note, capsys):
    argv = ["plan", *argv, "--image", "512x512"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert note in out.out and "Traceback" not in out.err
    assert main([*argv, "--json"]) == 0
    assert note in json.loads(capsys.readouterr().out)["notes"]


@pytest.mark.parametrize("argv", [
    ["--model", "llava-1.5-7b"],  # the --detail default is not the user's setting
    ["--model", "gpt-4o", "--detail", "low"],
    ["--model", "gemini-2.5-pro", "--media-resolution", "low"],
    ["--model", "gemini-2.0-flash", "--rule", "gemini_image_rule=crop_unit"],
    ["--model", "gemma-3-27b", "--pan-and-scan"],
    ["--model", "qwen2.5-vl-7b", "--max-pixels", "1000000", "--min-pixels", "3136"],
    ["--model", "claude-3.5-sonnet", "--rule", "claude_rule=patch28"],
])
def test_a_setting_the_model_uses_is_not_noted(argv, capsys):
    assert main(["plan", *argv, "--image", "512x512", "--json"]) == 0
    assert not [n for n in json.loads(capsys.readouterr().out)["notes"] if "ignored" in n]


def test_a_setting_read_for_one_medium_only_names_the_other(capsys):
    """gemini-2.0-flash applies media_resolution to video frames (66 at LOW) but not to images."""
    assert main(["plan", "--model", "gemini-2.0-flash", "--image", "512x512", "--video-seconds", "10",
                 "--media-resolution", "low", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [n for n in out["notes"] if "ignored" in n] == [
        "--media-resolution low is ignored by gemini-2.0-flash's image rule"]
    assert out["inputs"][1]["tokens"] == 10 * 66 + 10 * 32


def test_a_request_without_media_ignores_every_setting(capsys):
    assert main(["plan", "--model", "gpt-4o", "--text-tokens", "20", "--detail", "low", "--json"]) == 0
    assert "--detail low is ignored by gpt-4o: the request has no image, audio or video" in \
        json.loads(capsys.readouterr().out)["notes"]


def test_compare_names_the_models_that_ignore_a_setting(capsys):
    argv = ["plan", "--compare", "gpt-4o,llava-1.5-7b,claude-3.5-sonnet", "--image", "512x512", "--detail", "low"]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert lines == ["note: --detail low is ignored by llava-1.5-7b's image rule",
                     "note: --detail low is ignored by claude-3.5-sonnet's image rule"]
    assert main([*argv, "--json"]) == 0
    ignored = {p["model"]: [n for n in p["notes"] if "ignored" in n] for p in json.loads(capsys.readouterr().out)}
    assert ignored == {"gpt-4o": [], "llava-1.5-7b": ["--detail low is ignored by llava-1.5-7b's image rule"],
                       "claude-3.5-sonnet": ["--detail low is ignored by claude-3.5-sonnet's image rule"]}


def test_the_default_batch_is_the_knee_of_throughput_within_memory():
    """Without --concurrency the serving estimate runs the batch a continuous-batching server would:
    the smallest that reaches 98% of the throughput of the largest batch whose caches fit."""
    h100 = load_hardware()["h100"]
    model = resolve_model("llava-1.5-7b")
    work = Workload(images=((336, 336),), text_tokens=50, output_tokens=100)
    auto = plan(model, work, accelerator=h100)
    batch = auto["serving"]["concurrency"]
    assert batch > 8 and "within memory" in auto["serving"]["concurrency_choice"]

    def tps(c):
        return plan(model, dataclasses.replace(work, concurrency=c), accelerator=h100)["latency"]["decode_tokens_per_s"]

    fits = int(auto["serving"]["concurrency_choice"].split(": ")[1].split(" ")[0].replace(",", ""))
    assert tps(batch) >= 0.98 * tps(fits) > tps(batch - 1)
    assert auto["serving"]["gpus_per_replica"] == 1  # the choice stays on the GPUs the weights need
    one = plan(model, dataclasses.replace(work, concurrency=1), accelerator=h100)
    assert one["serving"]["concurrency"] == 1 and one["serving"]["concurrency_choice"] == "set by --concurrency"


def test_a_checkpoint_folder_is_planned_from_its_config(tmp_path):
    from hf_fixtures import save_llava

    from omnifuse.interop import read_any_config

    folder = save_llava(tmp_path / "llava")
    p = plan(resolve_model(str(folder)), Workload(images=((64, 48),), text_tokens=10))
    config = read_any_config(folder)
    assert p["parameters"]["total"] == count_parameters(config)["total"]
    assert p["context_tokens"] == 10 + config.tokens_per_crop
