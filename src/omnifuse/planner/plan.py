"""One plan: a model and a workload -> tokens, memory, FLOPs, latency, GPUs and money.

Token counts come from one place per model: a vendor's published rule (``tokens.py``) or, for
omnifuse's own models, ``costs.image_cost`` (the image processor). Architecture figures come from the
model's config (presets) or its published config (``published.py``); closed models get token
counts and API cost only, unless an assumed architecture is given (then marked estimated).

Cross-attention states are counted twice (see ``costs.py``): ``cross_attention_states_prefill``
(encoded, turned into K/V and attended over at prefill) and ``cross_attention_states_decode``
(attended at decode, all the decode cache keeps). A request's images are taken to sit together
before its text (the pipeline's layout for a prompt without placeholders), so the last prompt
token attends to all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnifuse.config import ModelConfig
from omnifuse.errors import PlanError
from omnifuse.planner import tokens as rules
from omnifuse.planner.arch import (
    Architecture,
    MediaWork,
    cache_bytes,
    from_model_config,
)
from omnifuse.planner.resources import Accelerator, Prices

__all__ = ["DTYPE_BYTES", "PlanError", "Workload", "ignored_options", "known_models", "plan", "resolve_model"]

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
MEMORY_HEADROOM = 0.9  # fraction of accelerator memory usable for weights + cache


@dataclass(frozen=True)
class Workload:
    images: tuple[tuple[int, int], ...] = ()
    audio_seconds: float = 0.0
    video_seconds: float = 0.0
    fps: float = 1.0
    video_size: tuple[int, int] = (1280, 720)
    text_tokens: int = 0
    output_tokens: int = 0
    requests_per_day: int = 0
    # Requests decoding at once per replica; None: the batch with the highest throughput within memory.
    concurrency: int | None = None

    def __post_init__(self) -> None:
        for w, h in self.images:
            if w <= 0 or h <= 0:
                raise PlanError(f"image size {w}x{h} is impossible: width and height must be positive")
        w, h = self.video_size
        if w <= 0 or h <= 0:
            raise PlanError(f"video size {w}x{h} is impossible: width and height must be positive")
        for name in ("audio_seconds", "video_seconds", "text_tokens", "output_tokens", "requests_per_day"):
            if getattr(self, name) < 0:
                raise PlanError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.fps <= 0:
            raise PlanError(f"fps must be positive, got {self.fps}")
        for name in ("audio_seconds", "video_seconds", "fps"):  # nan and inf would reach int() as a traceback
            if not math.isfinite(getattr(self, name)):
                raise PlanError(f"{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise PlanError(f"concurrency must be at least 1, got {self.concurrency}")


@dataclass(frozen=True)
class PlanModel:
    """What the planner knows about a model name."""

    name: str
    rule: rules.TokenRule | None  # a vendor's published token rule
    config: ModelConfig | None  # an omnifuse config (its processor counts tokens when ``rule`` is None)
    arch: Architecture | None
    estimated: bool = False
    notes: tuple[str, ...] = ()


def known_models() -> list[str]:
    from omnifuse.presets import preset_names

    return sorted(set(rules.RULES) | set(preset_names()))


def _architecture_for(name: str) -> tuple[Architecture | None, ModelConfig | None]:
    from omnifuse.planner.published import PUBLISHED
    from omnifuse.presets import PRESETS

    if name in PRESETS:
        return from_model_config(PRESETS[name]), PRESETS[name]
    return PUBLISHED.get(name), None


def resolve_model(name: str, assume: str | None = None) -> PlanModel:
    """A vendor model name, an omnifuse preset, or an omnifuse model config file (YAML/JSON).
    ``assume``: an architecture (any of those) to price a closed model with, marked estimated."""
    from omnifuse.config import load_config
    from omnifuse.presets import PRESETS

    if name in rules.RULES:
        arch, config = _architecture_for(name)
        plan_model = PlanModel(name, rules.RULES[name], config, arch)
    elif name in PRESETS:
        plan_model = PlanModel(name, None, PRESETS[name], from_model_config(PRESETS[name]))
    elif Path(name).suffix in (".yaml", ".yml", ".json") and Path(name).is_file():
        config = load_config(name)
        plan_model = PlanModel(config.name or name, None, config, from_model_config(config))
    elif Path(name).is_dir():  # a checkpoint folder, omnifuse or Hugging Face (its config only)
        from omnifuse.interop import read_any_config

        config = read_any_config(name)
        plan_model = PlanModel(config.name or Path(name).name, None, config, from_model_config(config))
    else:
        raise PlanError(f"unknown model {name!r}; known models: {', '.join(known_models())} "
                        "(or an omnifuse model config file, or a checkpoint folder)")
    if assume:
        if plan_model.arch is not None:
            raise PlanError(f"{name} has a published architecture; --assume-architecture is for closed models")
        assumed = resolve_model(assume)
        if assumed.arch is None:
            raise PlanError(f"--assume-architecture {assume}: that model has no architecture either")
        note = (f"architecture assumed to be {assumed.name}'s: every memory, FLOP, latency and self-hosting "
                "figure is an estimate")
        plan_model = PlanModel(plan_model.name, plan_model.rule, None, assumed.arch, estimated=True, notes=(note,))
    return plan_model


# ---------------------------------------------------------------------------------------------
# Tokens


def _media_kinds(workload: Workload) -> list[str]:
    return [kind for kind, present in (("image", workload.images), ("audio", workload.audio_seconds),
                                       ("video", workload.video_seconds)) if present]


def ignored_options(model: PlanModel, workload: Workload, given: dict[str, str]) -> list[str]:
    """Notes on the token settings the user gave that change nothing for ``model`` on ``workload``,
    so that a setting meant for another model is not mistaken for one applied. ``given`` maps a
    ``TokenOptions`` field to the option as the user spelled it (``--detail low``)."""
    kinds = _media_kinds(workload)
    if model.rule is None:
        return [f"{spelled} is ignored by {model.name}: omnifuse models count tokens with their own image processor"
                for spelled in given.values()]
    if not kinds:
        return [f"{spelled} is ignored by {model.name}: the request has no image, audio or video"
                for spelled in given.values()]
    notes = []
    for name, spelled in given.items():
        unread = [kind for kind in kinds if name not in rules.options_read(model.name, [kind])]
        if unread:  # a setting read for one medium but not another is named for the one that ignores it
            plural = "s" if len(unread) > 1 else ""
            notes.append(f"{spelled} is ignored by {model.name}'s {' and '.join(unread)} rule{plural}")
    return notes


def _input(kind: str, width: int | None, height: int | None, seconds: float | None, tokens: int, prefill: int,
           decode: int, note: str) -> dict[str, Any]:
    return {"kind": kind, "width": width, "height": height, "seconds": seconds, "tokens": tokens,
            "cross_attention_states_prefill": prefill, "cross_attention_states_decode": decode, "note": note}


def _own_image(config: ModelConfig, width: int, height: int) -> tuple[dict[str, Any], MediaWork]:
    from omnifuse.planner.costs import image_cost
    from omnifuse.processing.tiles import canvas_label

    cost = image_cost(config, width, height)
    (gh, gw), (rows, cols) = cost.patch_grid, cost.tile_canvas
    from omnifuse.connectors import encoder_tokens

    work = MediaWork(crops=cost.crops, context_tokens=cost.context_tokens,
                     cross_states_prefill=cost.cross_attention_states_prefill,
                     cross_states_decode=cost.cross_attention_states_decode, patches_per_crop=gh * gw,
                     encoder_positions=cost.crops * encoder_tokens(config.vision, (gh, gw))[0])
    canvas = f" on a {canvas_label(rows, cols)} tile canvas" if config.image.mode == "tiles" else ""
    note = f"{cost.crops} crop(s) of {canvas_label(gh, gw)} patches{canvas} (omnifuse {config.image.mode} mode)"
    return _input("image", width, height, None, work.context_tokens, work.cross_states_prefill,
                  work.cross_states_decode, note), work


def _media_work(model: PlanModel, count: rules.TokenCount) -> list[MediaWork]:
    """Encoder work behind a vendor rule's count (one entry per image or video frame)."""
    if model.arch is None:
        return []
    enc = model.arch.encoder
    frames = count.frames
    crops = max(1, count.crops // frames)
    ctx, prefill, decode = (n // frames for n in (count.context_tokens, count.cross_states_prefill,
                                                  count.cross_states_decode))
    patches = None
    if enc is not None and enc.dynamic:  # Qwen: each temporal slice is one sequence of merged patches
        merge = model.arch.connector.merge if model.arch.connector else 1
        patches = (ctx - 2) * merge // crops  # minus <|vision_start|>, <|vision_end|>
    positions = prefill  # cross-attention models hand every encoder state on
    if enc is not None and not prefill:
        per_crop = patches if patches is not None else enc.patches_per_crop
        qformer = model.arch.connector is not None and model.arch.connector.kind == "qformer"
        positions = crops * (per_crop + (enc.cls_tokens if qformer else 0))  # others drop CLS
    return [MediaWork(crops=crops, context_tokens=ctx, cross_states_prefill=prefill, cross_states_decode=decode,
                      patches_per_crop=patches, encoder_positions=positions)] * frames


def count_inputs(model: PlanModel, workload: Workload, options: rules.TokenOptions) -> tuple[list[dict], list[MediaWork]]:
    inputs: list[dict[str, Any]] = []
    work: list[MediaWork] = []
    for w, h in workload.images:
        if model.rule is None:
            entry, item = _own_image(model.config, w, h)
            inputs.append(entry)
            work.append(item)
            continue
        c = rules.image_tokens(model.name, w, h, options)
        inputs.append(_input("image", w, h, None, c.context_tokens, c.cross_states_prefill, c.cross_states_decode,
                             c.note))
        work += _media_work(model, c)
    if workload.audio_seconds and model.rule is None:
        from omnifuse.planner.costs import audio_cost, audio_encoder_flops

        if model.config is None or model.config.audio is None:
            raise PlanError(f"{model.name} has no audio encoder")
        samples = round(workload.audio_seconds * model.config.audio.sampling_rate)
        c = audio_cost(model.config, samples)
        inputs.append(_input("audio", None, None, workload.audio_seconds, c.context_tokens, c.cross_attention_states_prefill,
                             c.cross_attention_states_decode,
                             f"{c.chunks} chunk(s) of {model.config.audio.chunk_seconds:g} s, {c.media_tokens} tokens "
                             "(omnifuse audio processor)"))
        work.append(MediaWork(crops=0, context_tokens=c.context_tokens, cross_states_prefill=c.cross_attention_states_prefill,
                              cross_states_decode=c.cross_attention_states_decode,
                              flops=audio_encoder_flops(model.config, samples)))
    elif workload.audio_seconds:
        c = rules.audio_tokens(model.name, workload.audio_seconds, options)
        inputs.append(_input("audio", None, None, workload.audio_seconds, c.context_tokens, c.cross_states_prefill,
                             c.cross_states_decode, c.note))
    if workload.video_seconds:
        w, h = workload.video_size
        if model.rule is None:  # omnifuse models: the video processor's sampling contract
            from omnifuse.planner.costs import video_cost, video_encoder_flops

            if model.config is None or model.config.video is None:
                raise PlanError(f"{model.name} takes no video (its config has no video section)")
            c = video_cost(model.config, workload.video_seconds, w, h, workload.fps)
            inputs.append(_input("video", w, h, workload.video_seconds, c.context_tokens, c.cross_attention_states_prefill,
                                 c.cross_attention_states_decode,
                                 f"{c.frames} frames at {workload.fps:g} fps (k / fps), {c.media_tokens} tokens "
                                 "(omnifuse video processor)"))
            work.append(MediaWork(crops=0, context_tokens=c.context_tokens, cross_states_prefill=c.cross_attention_states_prefill,
                                  cross_states_decode=c.cross_attention_states_decode,
                                  flops=video_encoder_flops(model.config, c.frames)))
        else:
            c = rules.video_tokens(model.name, workload.video_seconds, workload.fps, w, h, options=options)
            inputs.append(_input("video", w, h, workload.video_seconds, c.context_tokens, c.cross_states_prefill,
                                 c.cross_states_decode, c.note))
            work += _media_work(model, c)
    return inputs, work


# ---------------------------------------------------------------------------------------------
# Cost


def _weights_read(arch: Architecture, total: int, dtype_bytes: float, batch: int) -> float:
    """Weight bytes one decode step reads: every dense weight, and the experts the batch routes to."""
    d = arch.decoder
    unused = d.inactive_parameters()
    if unused:
        e, k = d.experts, d.experts_per_token
        touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts per MoE layer
        unused = unused * (e - touched) / (e - k) if e > k else 0
    return (total - unused) * dtype_bytes


def _latency(arch: Architecture, total: int, acc: Accelerator, dtype: str, kv_dtype_bytes: float, context: int,
             output: int, prefill_flops: int, states: int, batch: int, gpus: int) -> dict[str, float]:
    """Roofline: each phase takes the longer of its compute time and its memory-traffic time.
    ``states``: cross-attention states attended at decode."""
    peak = acc.peak_flops(dtype) * gpus
    bandwidth = acc.bandwidth_gb_s * 1e9 * gpus
    w_bytes = total * DTYPE_BYTES[dtype]
    prefill = max(prefill_flops / peak, w_bytes / bandwidth)
    mid = context + max(1, output) // 2 + 1  # the average decode step's context length
    step_flops = arch.decode_flops(mid, states)
    kv = cache_bytes(arch.decoder, mid, 0, states, kv_dtype_bytes).decode
    step = max(batch * step_flops / peak, (_weights_read(arch, total, DTYPE_BYTES[dtype], batch) + batch * kv) / bandwidth)
    return {"prefill_s": prefill, "decode_s_per_token": step, "request_s": prefill + output * step,
            "decode_tokens_per_s": batch / step}


def plan(model: PlanModel, workload: Workload, options: rules.TokenOptions | None = None,
         accelerator: Accelerator | None = None, prices: Prices | None = None, dtype: str = "bf16",
         kv_dtype: str | None = None) -> dict[str, Any]:
    """Everything the planner can say about ``workload`` on ``model``, as one JSON-ready dict."""
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    kv_dtype = kv_dtype or ("bf16" if dtype in ("int8", "int4") else dtype)
    if kv_dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown kv dtype {kv_dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    options = options or rules.TokenOptions()
    inputs, work = count_inputs(model, workload, options)
    media_tokens = sum(i["tokens"] for i in inputs)
    prefill_states = sum(i["cross_attention_states_prefill"] for i in inputs)
    states = sum(i["cross_attention_states_decode"] for i in inputs)
    context = workload.text_tokens + media_tokens
    window = model.rule.context_window if model.rule is not None else (
        model.config.decoder.max_position if model.config is not None else None)
    out: dict[str, Any] = {
        "model": model.name,
        "fusion": model.rule.fusion if model.rule is not None else model.config.fusion.type,
        "inputs": inputs,
        "text_tokens": workload.text_tokens,
        "output_tokens": workload.output_tokens,
        "context_tokens": context,
        "cross_attention_states_prefill": prefill_states,  # encoded and cached at prefill
        "cross_attention_states_decode": states,  # attended at decode: all the decode cache keeps
        "context_window": window,
        "fits_context": None if window is None else context + workload.output_tokens <= window,
        "estimated": model.estimated,
        "sources": {"tokens": f"{model.rule.source} (read {model.rule.date})" if model.rule is not None
                    else "omnifuse image processor (planner/costs.py image_cost)"},
        "notes": list(model.notes),
        "parameters": None, "weight_bytes": None, "kv_cache_bytes": None, "kv_cache_bytes_by_kind": None,
        "prefill_flops": None, "prefill_flops_by_part": None, "decode_flops_per_token": None,
        "latency": None, "serving": None,
    }
    arch = model.arch
    if arch is not None:
        if model.config is not None:  # an omnifuse config: count the parameters of the built model
            from omnifuse.planner.costs import active_parameters, count_parameters

            total = count_parameters(model.config)["total"]
            params = {"total": total, "active": active_parameters(model.config, total)}
        else:
            params = arch.parameters()
        out["sources"]["architecture"] = arch.source
        out["notes"] += list(arch.notes)
        out["parameters"] = {"total": params["total"], "active": params["active"]}
        out["weight_bytes"] = {k: params["total"] * v for k, v in DTYPE_BYTES.items()}
        kv = cache_bytes(arch.decoder, context + workload.output_tokens, prefill_states, states, DTYPE_BYTES[kv_dtype])
        out["kv_dtype"] = kv_dtype
        out["kv_cache_bytes_by_kind"] = kv.as_dict()
        out["kv_cache_bytes"] = kv.decode  # the cache held while decoding: self-attention + cross at decode
        prefill = arch.prefill_flops(context, work)
        out["prefill_flops_by_part"] = {k: v for k, v in prefill.items() if k != "total"}
        out["prefill_flops"] = prefill["total"]
        out["decode_flops_per_token"] = arch.decode_flops(context + 1, states)
        if accelerator is not None:
            out.update(_serve(arch, out, accelerator, workload, dtype, kv_dtype, prefill["total"], states))
    elif model.rule is not None:
        out["notes"].append(f"{model.name} has no published architecture: token counts and API cost only "
                            "(--assume-architecture prices it as another model, marked estimated)")
    out["cost"] = _cost(model, out, workload, prices, accelerator)
    return out


MAX_BATCH = 4096  # the largest batch the automatic choice considers


def _best_batch(arch: Architecture, out: dict, acc: Accelerator, workload: Workload, dtype: str, kv_dtype: str,
                prefill_flops: int, states: int, weights: float, per_gpu: float) -> tuple[int, str]:
    """The batch a continuous-batching server runs (``omnifuse serve``): as many requests' caches as
    fit beside the weights on the GPUs the weights need, but no more than it takes to reach 98% of
    that batch's decode throughput (past the roofline's knee a larger batch only adds latency)."""
    gpus = max(1, math.ceil(weights / per_gpu))
    kv = max(1, out["kv_cache_bytes"])
    fits = int(min(MAX_BATCH, max(1, (gpus * per_gpu - weights) // kv)))

    def tokens_per_s(batch: int) -> float:
        return _latency(arch, out["parameters"]["total"], acc, dtype, DTYPE_BYTES[kv_dtype], out["context_tokens"],
                        workload.output_tokens, prefill_flops, states, batch, gpus)["decode_tokens_per_s"]

    best = tokens_per_s(fits)
    lo, hi = 1, fits  # throughput does not fall as the batch grows: the smallest batch within 2% of the best
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if tokens_per_s(mid) >= 0.98 * best else (mid + 1, hi)
    why = (f"the highest decode throughput within memory: {fits:,} requests' caches fit beside the weights on "
           f"{gpus} {acc.key}, a larger batch gains < 2%; --concurrency sets another")
    return lo, why


def _serve(arch: Architecture, out: dict, acc: Accelerator, workload: Workload, dtype: str, kv_dtype: str,
           prefill_flops: int, states: int) -> dict[str, Any]:
    weights = out["parameters"]["total"] * DTYPE_BYTES[dtype]
    per_gpu = acc.memory_gb * 2 ** 30 * MEMORY_HEADROOM
    c, why = workload.concurrency, "set by --concurrency"
    if c is None:
        c, why = _best_batch(arch, out, acc, workload, dtype, kv_dtype, prefill_flops, states, weights, per_gpu)
    need = weights + c * out["kv_cache_bytes"]
    gpus = max(1, math.ceil(need / per_gpu))
    lat = _latency(arch, out["parameters"]["total"], acc, dtype, DTYPE_BYTES[kv_dtype], out["context_tokens"], workload.output_tokens,
                   prefill_flops, states, c, gpus)
    serving: dict[str, Any] = {"accelerator": acc.key, "accelerator_name": acc.name, "dtype": dtype,
                               "concurrency": c, "concurrency_choice": why, "memory_bytes": int(need),
                               "gpus_per_replica": gpus}
    if workload.requests_per_day:
        per_second = workload.requests_per_day / 86400
        throughput = c / lat["request_s"]  # requests per second one replica finishes
        replicas = max(1, math.ceil(per_second / throughput))
        serving.update(replicas=replicas, gpus=replicas * gpus, requests_per_second_per_replica=throughput)
    return {"latency": {"accelerator": acc.key, **lat}, "serving": serving}


def _cost(model: PlanModel, out: dict, workload: Workload, prices: Prices | None,
          acc: Accelerator | None) -> dict[str, Any] | None:
    if not workload.requests_per_day or prices is None:
        return None
    cost: dict[str, Any] = {"requests_per_day": workload.requests_per_day, "prices_date": prices.date,
                            "prices_file": prices.path, "api_usd_per_day": None, "self_hosted_usd_per_day": None}
    api = prices.api_price(model.name)
    if api is not None:
        audio = sum(i["tokens"] for i in out["inputs"] if i["kind"] == "audio")
        # Cross-attention models are billed for their encoder states (Together: 1601 per real tile).
        billed = out["context_tokens"] + out["cross_attention_states_decode"] - audio
        per_request = (billed * api["input"] + audio * api.get("audio_input", api["input"])
                       + workload.output_tokens * api["output"]) / 1e6
        cost.update(api_usd_per_request=per_request, api_usd_per_day=per_request * workload.requests_per_day,
                    api_billed_input_tokens=billed + audio, api_source=api.get("source", ""))
    if out.get("serving") and "gpus" in out["serving"]:
        rate = prices.gpu_price(acc.key)
        cost.update(gpu_usd_per_hour=rate, self_hosted_usd_per_day=out["serving"]["gpus"] * 24 * rate)
    if cost["api_usd_per_day"] is None and cost["self_hosted_usd_per_day"] is None:
        why = "no accelerator was chosen (--gpu)" if model.arch is not None else "it has no published architecture"
        raise PlanError(f"no API price for {model.name} in the price file {prices.path} (dated {prices.date}) "
                        f"and it cannot be priced self-hosted because {why}; add api: {{{model.name}: "
                        "{input: ..., output: ...}}")
    return cost
