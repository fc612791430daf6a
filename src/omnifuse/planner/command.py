"""``omnifuse plan``: arguments and the command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from omnifuse.planner.plan import PlanError

__all__ = ["add_plan_parser", "cmd_plan"]


def _size(text: str, flag: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise PlanError(f"{flag} expects WIDTHxHEIGHT like 1024x768, got {text!r}") from None
    return w, h


def _compare_names(text: str) -> list[str]:
    """The models of --compare. An empty item (a stray or trailing comma) names nothing and is
    skipped; a repeated name is refused, as it more likely stands for a model mistyped than one
    wanted twice, and rows are matched to the list by position."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise PlanError(f"--compare {text!r} names no model; give model names separated by commas, "
                        "e.g. --compare gpt-4o,llava-1.5-7b")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PlanError(f"--compare names {', '.join(repeated)} more than once; list each model once")
    return names


def _plot_path(text: str) -> Path:
    """The file --plot will write, checked before any work. matplotlib takes the format from the
    suffix and writes NAME.png for a name without one; resolving that here makes the path printed
    the path written."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(text)
    if not path.suffix and not path.is_dir():
        path = path.with_suffix(".png")
    if path.is_dir():
        raise PlanError(f"--plot {path} is a folder; give a file name, e.g. {path / 'plan.png'}")
    if not path.resolve().parent.is_dir():
        raise PlanError(f"cannot write the plot {path}: its folder does not exist")
    if path.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise PlanError(f"--plot {path}: cannot draw {path.suffix} files; use .png, .svg or .pdf")
    return path


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="tokens, memory, FLOPs, latency, GPUs and $/day of a multimodal workload",
                       description="Map images, audio and video through each model's published token rule "
                                   "to context tokens, KV cache, FLOPs, roofline latency, GPUs and cost.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="a model name (see --list), an omnifuse preset, a model config file or a "
                                     "checkpoint folder")
    who.add_argument("--preset", help="an omnifuse preset (with --measure: build it and check the prediction)")
    who.add_argument("--compare", help="several models side by side, comma-separated")
    who.add_argument("--list", action="store_true", help="list the models the planner knows")
    p.add_argument("--image", action="append", default=[], metavar="WxH", help="an image; repeat for more")
    p.add_argument("--audio-seconds", type=float, default=0.0)
    p.add_argument("--video-seconds", type=float, default=0.0)
    p.add_argument("--fps", type=float, default=1.0, help="video frames sampled per second (default 1)")
    p.add_argument("--video-size", default="1280x720", metavar="WxH", help="video frame size (default 1280x720)")
    p.add_argument("--text-tokens", type=int, default=0, help="prompt text tokens per request")
    p.add_argument("--output-tokens", type=int, default=0, help="generated tokens per request")
    p.add_argument("--requests-per-day", type=int, default=0, help="for $/day: the vendor API and self-hosting")
    p.add_argument("--concurrency", type=int, help="requests decoding at once per replica (default: the batch with "
                                                   "the highest throughput within memory, as omnifuse serve runs)")
    p.add_argument("--gpu", default="h100", help="accelerator for latency and GPU counts: h100, h200, a100, "
                                                 "tpu-v5p, cpu (this machine), or one from --hardware")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16", "int8", "int4"], help="weights")
    p.add_argument("--kv-dtype", choices=["fp32", "bf16", "fp16", "int8"], help="KV cache (default: weights', bf16 for int8/int4)")
    p.add_argument("--detail", choices=["high", "low", "auto"], help="OpenAI image detail (default high)")
    p.add_argument("--max-pixels", type=int, help="Qwen2-VL / 2.5-VL max_pixels")
    p.add_argument("--min-pixels", type=int, help="Qwen2-VL / 2.5-VL min_pixels")
    p.add_argument("--pan-and-scan", action="store_true", help="Gemma 3 pan & scan crops")
    p.add_argument("--media-resolution", choices=["low", "medium", "high", "unspecified"], help="Gemini 2.5")
    p.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE",
                   help="pick the alternative reading of an ambiguous source, e.g. gemini_image_rule=crop_unit "
                        "(see README)")
    p.add_argument("--assume-architecture", metavar="MODEL",
                   help="price a closed model as if it had this model's architecture (marked estimated)")
    p.add_argument("--prices", help="price file (default: the packaged, dated prices.yaml)")
    p.add_argument("--hardware", help="accelerator file (default: the packaged hardware.yaml)")
    p.add_argument("--measure", action="store_true", help="with --preset: build it, run the request, compare")
    p.add_argument("--json", action="store_true", help="print JSON (one object; a list with --compare)")
    p.add_argument("--plot", metavar="FILE", help="bar charts of tokens and cost per model; the suffix picks the "
                                                  "format (.png, .svg, .pdf ...), none writes FILE.png")
    p.set_defaults(func=cmd_plan)


_SETTINGS = {"detail": "--detail", "max_pixels": "--max-pixels", "min_pixels": "--min-pixels",
             "pan_and_scan": "--pan-and-scan", "media_resolution": "--media-resolution"}  # TokenOptions field: flag


def _options(args):
    """The token options, and those the user set (field -> as spelled): only a setting the user
    gave is reported when a model ignores it, so unset flags stay None (or False) here."""
    from omnifuse.planner.tokens import TokenOptions, TokenRuleError

    fields = {name: getattr(args, name) for name in _SETTINGS if getattr(args, name) not in (None, False)}
    given = {name: _SETTINGS[name] if value is True else f"{_SETTINGS[name]} {value}" for name, value in fields.items()}
    known = set(TokenOptions.__dataclass_fields__) - set(_SETTINGS)
    for item in args.rule:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise TokenRuleError(f"--rule {item!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(known))}")
        fields[name], given[name] = value, f"--rule {item}"
    return TokenOptions(**fields), given


def _accelerator(args):
    from omnifuse.planner.resources import load_hardware, local_cpu

    if args.gpu == "cpu":
        return local_cpu()
    table = load_hardware(args.hardware)
    if args.gpu not in table:
        where = f" in {args.hardware}" if args.hardware else ""
        raise PlanError(f"unknown accelerator {args.gpu!r}{where}; known: {', '.join([*table, 'cpu'])}")
    return table[args.gpu]


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from omnifuse.planner import report
    from omnifuse.planner.plan import (
        Workload,
        ignored_options,
        known_models,
        plan,
        resolve_model,
    )
    from omnifuse.planner.resources import load_prices

    if args.list:
        print("\n".join(known_models()))
        return 0
    names = _compare_names(args.compare) if args.compare is not None else [args.model or args.preset]
    plot = _plot_path(args.plot) if args.plot is not None else None
    images = tuple(_size(x, "--image") for x in args.image)
    workload = Workload(images=images, audio_seconds=args.audio_seconds, video_seconds=args.video_seconds,
                        fps=args.fps, video_size=_size(args.video_size, "--video-size"), text_tokens=args.text_tokens,
                        output_tokens=args.output_tokens, requests_per_day=args.requests_per_day,
                        concurrency=args.concurrency)
    if not (workload.images or workload.audio_seconds or workload.video_seconds or workload.text_tokens):
        raise PlanError("nothing to plan: give --image WxH, --audio-seconds, --video-seconds or --text-tokens")
    options, given = _options(args)
    prices = load_prices(args.prices)
    if args.measure:
        if not args.preset:
            raise PlanError("--measure needs --preset (it builds the model)")
        return _measure(args, workload, options, given)
    if args.preset:
        from omnifuse.presets import get_preset

        get_preset(args.preset)  # --preset accepts presets only
    accelerator = _accelerator(args)
    plans, ignored = [], []
    for name in names:
        model = resolve_model(name)
        if args.assume_architecture and (model.arch is None or not args.compare):  # closed models, in --compare
            model = resolve_model(name, args.assume_architecture)
        plans.append(plan(model, workload, options, accelerator, prices, args.dtype, args.kv_dtype))
        notes = ignored_options(model, workload, given)
        plans[-1]["notes"] += notes
        ignored += notes
    if plot:
        report.plot_plans(plans, str(plot))
    if args.json:
        print(json.dumps(plans if args.compare is not None else plans[0], indent=2))
        return 0
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.compare is not None:  # the side-by-side table has no notes column: say it under the table
        console.print(report.compare_table(plans))
        _print_notes(console, ignored)
    else:
        console.print(report.plan_table(plans[0]))
    if plot:
        console.print(f"plot: {plot}", markup=False)
    return 0


def _print_notes(console, notes: list[str]) -> None:
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)


def _measure(args, workload, options, given) -> int:
    """Predicted (planner) vs measured (the built preset) for one request on this machine."""
    from rich.console import Console

    from omnifuse.planner import report
    from omnifuse.planner.costs import count_parameters
    from omnifuse.planner.measure import MEASURE_MAX_PARAMETERS, measure_request
    from omnifuse.planner.plan import ignored_options, plan, resolve_model
    from omnifuse.planner.resources import local_cpu

    model = resolve_model(args.preset)
    total = count_parameters(model.config)["total"]
    if total > MEASURE_MAX_PARAMETERS:
        raise PlanError(f"--measure builds {args.preset} in float32 here ({total * 4 / 2 ** 30:.1f} GiB); "
                        f"it is for presets under {MEASURE_MAX_PARAMETERS / 1e9:g}B parameters")
    if workload.text_tokens < 1:
        raise PlanError("--measure needs --text-tokens of at least 1 (the prompt)")
    workload = dataclasses.replace(workload, output_tokens=max(1, workload.output_tokens))  # decode at least once
    cpu = local_cpu()
    predicted = plan(model, workload, options, cpu, None, dtype="fp32", kv_dtype="fp32")
    ignored = ignored_options(model, workload, given)
    predicted["notes"] += ignored
    measured = measure_request(model.config, list(workload.images), workload.text_tokens, workload.output_tokens,
                               audio_seconds=workload.audio_seconds, video_seconds=workload.video_seconds,
                               video_size=workload.video_size, fps=workload.fps)
    result = _compare(predicted, measured)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = Console() if sys.stdout.isatty() else Console(width=160)
        console.print(report.measure_table(result["rows"]))
        _print_notes(console, ignored)
    return 0 if result["agree"] else 2


def _compare(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    def exact(p, m):
        return "equal" if p == m else "DIFFERENT"

    def within(p, m, tol):
        err = abs(p - m) / max(1, m)
        return f"{err:.2%} off" + ("" if err <= tol else f" (over {tol:.0%})")

    # visual tokens: those in the context (early), or the states encoded at prefill (cross)
    visual_pred = [i["cross_attention_states_prefill"] or i["tokens"] for i in predicted["inputs"]]
    kv_pred = predicted["kv_cache_bytes"]
    lat = predicted["latency"]
    rows = [
        ("media tokens per item", str(visual_pred), str(measured["visual_tokens"]),
         exact(visual_pred, measured["visual_tokens"])),
        ("context tokens", predicted["context_tokens"], measured["context_tokens"],
         exact(predicted["context_tokens"], measured["context_tokens"])),
        ("KV cache bytes", int(kv_pred), measured["kv_cache_bytes"], exact(int(kv_pred), measured["kv_cache_bytes"])),
        ("prefill FLOPs", predicted["prefill_flops"], measured["prefill_flops"],
         within(predicted["prefill_flops"], measured["prefill_flops"], 0.02)),
        ("decode FLOPs / token", predicted["decode_flops_per_token"], measured["decode_flops_per_token"],
         within(predicted["decode_flops_per_token"], measured["decode_flops_per_token"], 0.02)),
        ("prefill latency (roofline vs measured)", f"{lat['prefill_s'] * 1e3:.2f} ms",
         f"{measured['prefill_seconds'] * 1e3:.2f} ms", f"{measured['prefill_seconds'] / lat['prefill_s']:.1f}x slower"),
        ("decode latency / token", f"{lat['decode_s_per_token'] * 1e3:.3f} ms",
         f"{measured['decode_seconds_per_token'] * 1e3:.3f} ms",
         f"{measured['decode_seconds_per_token'] / lat['decode_s_per_token']:.1f}x slower"),
    ]
    agree = (visual_pred == measured["visual_tokens"] and predicted["context_tokens"] == measured["context_tokens"]
             and int(kv_pred) == measured["kv_cache_bytes"]
             and abs(predicted["prefill_flops"] - measured["prefill_flops"]) <= 0.02 * measured["prefill_flops"]
             and abs(predicted["decode_flops_per_token"] - measured["decode_flops_per_token"])
             <= 0.02 * measured["decode_flops_per_token"])
    return {"model": predicted["model"], "agree": agree, "rows": rows, "predicted": predicted, "measured": measured}
