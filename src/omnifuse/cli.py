"""The ``omnifuse`` command line: generate, info, train, arena, plan, serve, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named preset (random weights, seeded); see `omnifuse info --list`")
    src.add_argument("--checkpoint", help="a checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_device_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    from omnifuse.runtime import DEVICES, DTYPES

    if training:  # a training config says where it runs; the flags override it
        p.add_argument("--device", choices=DEVICES, help="overrides the config's device (default cpu)")
        p.add_argument("--dtype", choices=list(DTYPES), help="overrides the config's dtype (default float32; "
                       "bfloat16/float16 train in mixed precision)")
        return
    p.add_argument("--device", choices=DEVICES, help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on a CPU, bfloat16 on a GPU")


def _pipeline_options(args: argparse.Namespace) -> dict:
    """The model options of generate / serve, as ``load_pipeline``'s keywords (plain, picklable values)."""
    return {"preset": args.preset, "checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
            "quantize": args.quantize, "merge_tokens": getattr(args, "merge_tokens", 0)}


def _pipeline(args: argparse.Namespace):
    from omnifuse.pipeline import load_pipeline

    return load_pipeline(**_pipeline_options(args))


def _device_settings(args: argparse.Namespace) -> dict[str, str]:
    """``--device`` / ``--dtype`` of train and arena, as the training-config settings they override."""
    return {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}


def cmd_generate(args: argparse.Namespace) -> int:
    pipe = _pipeline(args)
    sampling = pipe.sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    stream = not args.json and sys.stdout.isatty()
    shown: list[int] = []
    printed = 0

    def on_token(tok: int) -> None:  # stream the text as it grows
        nonlocal printed
        shown.append(tok)
        text = pipe.tokenizer.decode(shown)
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)

    t0 = time.perf_counter()
    result = pipe.generate(args.prompt, args.image or [], sampling, chat=args.chat,
                           on_token=on_token if stream else None, audio=args.audio or [], video=args.video or [],
                           fps=args.fps, max_frames=args.max_frames)
    elapsed = time.perf_counter() - t0
    if args.json:
        out = {
            "text": result.text,
            "tokens": result.tokens,
            "prompt_tokens": result.prompt_tokens,
            "visual_tokens": result.visual_tokens,
            "cross_attention_states_prefill": result.cross_attention_states_prefill,
            "cross_attention_states_decode": result.cross_attention_states_decode,
            "completion_tokens": len(result.tokens),
            "finish_reason": result.finish_reason,
            "kv_cache_bytes": result.kv_cache_bytes,
            "kv_cache_bytes_by_kind": result.kv_cache_bytes_by_kind,
            "images": result.images,
            "audio": result.audio,
            "videos": result.videos,
            "seconds": round(elapsed, 4),
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        if not stream:
            sys.stdout.write(result.text)
        sys.stdout.write("\n")
        if not pipe.model.fusion.in_sequence:  # the visual states sit beside the sequence
            media = f"{result.prompt_tokens} prompt tokens + {result.cross_attention_states_decode} cross-attention states"
            if result.cross_attention_states_prefill != result.cross_attention_states_decode:
                media += f" ({result.cross_attention_states_prefill} encoded at prefill)"
        elif pipe.model.config.has_media:
            kinds = [(result.visual_tokens, "visual")] if result.images or not (result.audio or result.videos) else []
            if result.audio:
                kinds.append((sum(a["tokens"] for a in result.audio), "audio"))
            if result.videos:
                kinds.append((sum(v["tokens"] for v in result.videos), "video"))
            detail = f"{kinds[0][0]} of them {kinds[0][1]}" if len(kinds) == 1 else \
                " + ".join(f"{n} {kind}" for n, kind in kinds)
            media = f"{result.prompt_tokens} prompt tokens ({detail})"
        else:
            media = f"{result.prompt_tokens} prompt tokens"
        print(f"[{len(result.tokens)} tokens, {media}, KV cache {result.kv_cache_bytes:,} bytes, "
              f"{elapsed:.2f} s, finish: {result.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import uvicorn

    from omnifuse.config import ConfigError
    from omnifuse.serving.app import ServeSettings, create_app
    from omnifuse.serving.media import MediaLimits

    args.merge_tokens = 0
    root = Path(args.media_root) if args.media_root else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--media-root {args.media_root}: not a folder")
    for name in ("max_batch", "max_queue", "max_media", "max_image_pixels", "max_video_frames"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    name = args.served_model_name or args.preset or Path(args.checkpoint).resolve().name
    mib = 1 << 20
    settings = ServeSettings(
        model_name=name, max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
        kv_cache_bytes=int(args.kv_cache_mb * mib) if args.kv_cache_mb else None,
        encoder_cache_bytes=int(args.encoder_cache_mb * mib), prefix_cache_bytes=int(args.prefix_cache_mb * mib),
        api_key=args.api_key or os.environ.get("OMNIFUSE_API_KEY"),
        media_root=root, max_body_bytes=int(args.max_body_mb * mib),
        limits=MediaLimits(max_media=args.max_media, max_image_pixels=args.max_image_pixels,
                           max_audio_seconds=args.max_audio_seconds, max_video_frames=args.max_video_frames))
    if args.ray:
        from omnifuse.serving import replicas

        _check_model_source(args)  # before Ray starts: a wrong name or folder is said here, not in a replica log
        return replicas.run(_pipeline_options(args), settings, replicas=args.replicas, host=args.host,
                            port=args.port, address=args.ray_address, cpus=args.replica_cpus)
    if args.replicas != 1 or args.ray_address:
        raise ConfigError("--replicas and --ray-address need --ray (one process serves one replica)")
    from omnifuse.serving.engine import on_fresh_thread

    app = create_app(on_fresh_thread(_pipeline, args), settings)  # torch runs on the engine thread alone
    engine = app.state.engine
    print(f"omnifuse serve: {name} on http://{args.host}:{args.port}/v1 ({engine.rows} rows of {engine.context} "
          f"positions, KV cache {engine.kv_cache_bytes / mib:.1f} MiB)", file=sys.stderr)
    # The engine thread hands the GIL back and forth with the event loop's thread between torch calls;
    # Python's default 5 ms switch interval would stall every decode step behind the loop's work.
    sys.setswitchinterval(0.0002)
    # Connections beyond what the queue and the batch can hold get 503 from uvicorn at once.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5,
                limit_concurrency=args.max_queue + args.max_batch + 16)
    return 0


def _check_model_source(args: argparse.Namespace) -> None:
    """A clear error now for an unknown preset or an unreadable checkpoint folder."""
    if args.preset:
        from omnifuse.presets import get_preset

        get_preset(args.preset)
    else:
        from omnifuse.interop import read_any_config

        read_any_config(args.checkpoint)


def _image_size(text: str) -> tuple[int, int]:
    from omnifuse.config import ConfigError

    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image expects WIDTHxHEIGHT like 500x500, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"--image {text}: width and height must be positive")
    return w, h


def _machine_info(args: argparse.Namespace) -> int:
    """``omnifuse info --machine``: this CPU's features and measured rates (measured once, cached)."""
    from omnifuse.planner.resources import local_cpu_measurement

    data = local_cpu_measurement(remeasure=args.remeasure)
    if args.json:
        print(json.dumps(data))
        return 0
    from rich.console import Console
    from rich.table import Table

    from omnifuse.runtime import CPU_FEATURES

    table = Table(title="omnifuse info: this machine", show_header=False)
    rows = [("cpu", data["cpu"]), ("features", " ".join(data["features"]) or "none of " + ", ".join(CPU_FEATURES)),
            ("threads", str(data["threads"])), ("float32 matmul", f"{data['fp32_gflops']:,.1f} GFLOP/s (packed linears, as omnifuse runs them)"),
            ("bfloat16 matmul", f"{data['bf16_gflops']:,.1f} GFLOP/s ({data['bf16_vs_fp32']:.2f}x float32 on the same torch.mm)"),
            ("weight streaming (decode)", f"{data['bandwidth_gb_s']:,.1f} GB/s"), ("memory", f"{data['memory_gb']:,.1f} GiB"),
            ("measured", f"{data['date']}, cached in {data['path']} (--remeasure measures again)")]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from omnifuse.planner.costs import model_info
    from omnifuse.presets import get_preset, preset_names

    if args.list:
        print("\n".join(preset_names()))
        return 0
    if args.machine:
        return _machine_info(args)
    if args.preset:
        config = get_preset(args.preset)
    elif args.checkpoint:
        from omnifuse.interop import read_any_config

        config = read_any_config(args.checkpoint)
    else:
        from omnifuse.config import ConfigError

        raise ConfigError("give --preset NAME, --checkpoint DIR, --machine or --list")
    info = model_info(config, image_size=_image_size(args.image) if args.image else None)
    if args.json:
        print(json.dumps(info))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"omnifuse info: {info['name']}", show_header=False)
    for key, value in info.items():
        if isinstance(value, dict):  # parameters, tile_canvas
            for part, n in value.items():
                table.add_row(f"{key}.{part}", f"{n:,}")
        else:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from omnifuse.training.config import load_train_config
    from omnifuse.training.loop import Trainer

    cfg = load_train_config(args.config, [*args.overrides, *(f"{k}={v}" for k, v in _device_settings(args).items())])
    trainer = Trainer(cfg)
    if trainer.main:
        warnings = getattr(trainer.train_source, "warnings", [])
        for w in warnings[:20]:
            print(f"omnifuse: warning: skipped {w}", file=sys.stderr)
        if len(warnings) > 20:
            print(f"omnifuse: warning: ... {len(warnings) - 20} more records skipped", file=sys.stderr)
        Console().print(f"training {cfg.model} ({cfg.stage}): trainable {trainer.trainable}, "
                        f"{len(trainer.train_source)} records -> {cfg.out_dir}")
    result = trainer.run()
    if trainer.main:
        if result.get("dropped"):
            print(f"omnifuse: warning: {result['dropped']} rows dropped: too long to truncate safely "
                  f"(max_length {cfg.max_length})", file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items()}, default=str))
    return 0


def cmd_arena(args: argparse.Namespace) -> int:
    import dataclasses

    from omnifuse.arena import load_arena_config, run_arena

    config = load_arena_config(args.config)
    if args.out_dir:
        config = dataclasses.replace(config, out_dir=args.out_dir)
    chosen = _device_settings(args)
    if chosen:  # every training run of the arena (pre-training too) on that device and dtype
        config = dataclasses.replace(config, train={**config.train, **chosen},
                                     pretrain={**config.pretrain, **chosen} if config.pretrain else {})
    run_arena(config, quick=args.quick, seeds=getattr(args, "seeds", 1))
    print(f"report: {config.out_dir}/report.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.config = None
    return cmd_arena(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnifuse", description="Multimodal transformers: every fusion strategy in one codebase.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt and images")
    _add_model_args(g)
    g.add_argument("--image", action="append", help="an image file; repeat for several images")
    g.add_argument("--audio", action="append", help="an audio file (WAV, FLAC, OGG, MP3, M4A, ...); repeat for several")
    g.add_argument("--video", action="append", help="a video file (MP4, WebM, ...); repeat for several")
    g.add_argument("--fps", type=float, help="video frames per second to take (default: the model's, 1)")
    g.add_argument("--max-frames", type=int, help="refuse videos giving more frames (default: the model's)")
    g.add_argument("--prompt", required=True,
                   help="the prompt; <image> / <audio> / <video> mark where each item goes (else they go in front)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--quantize", choices=["int8"], help="int8 decoder weights (W8A8, CPU): about 2x faster decode")
    g.add_argument("--merge-tokens", type=int, default=0, metavar="R",
                   help="token merging (ToMe) in the vision encoder: R tokens merged per layer, no training; "
                        "fewer image tokens (--json gives the count)")
    _add_device_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named preset (random weights, seeded)")
    src.add_argument("--checkpoint", help="an omnifuse or Hugging Face checkpoint folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model name clients send (default: the preset or folder name)")
    s.add_argument("--max-batch", type=int, default=8, help="most requests decoding at once (rows of the batch)")
    s.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get 429 with Retry-After")
    s.add_argument("--context", type=int, help="positions per request, prompt and output (default: the model's)")
    s.add_argument("--kv-cache-mb", type=float,
                   help="KV-cache budget: the batch gets as many rows as it holds at --context, up to --max-batch")
    s.add_argument("--encoder-cache-mb", type=float, default=256, help="media encoder outputs kept for reuse")
    s.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="keys and values of prompts through their media, kept for prompts that begin the same (0: off)")
    s.add_argument("--quantize", choices=["int8"], help="int8 decoder weights (CPU)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $OMNIFUSE_API_KEY if set)")
    s.add_argument("--media-root", help="a folder whose files requests may name (file: URLs or relative paths)")
    s.add_argument("--max-body-mb", type=float, default=32, help="largest request body (413 beyond)")
    s.add_argument("--max-media", type=int, default=8, help="media parts per request")
    s.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height of one image")
    s.add_argument("--max-audio-seconds", type=float, default=120.0)
    s.add_argument("--max-video-frames", type=int, default=64)
    s.add_argument("--ray", action="store_true", help="run replicas on Ray Serve (pip install 'omnifuse[ray]')")
    s.add_argument("--replicas", type=int, default=1, help="with --ray: copies of the server behind Ray's proxy")
    s.add_argument("--ray-address", help="with --ray: join this Ray cluster (e.g. auto) instead of starting one here")
    s.add_argument("--replica-cpus", type=float,
                   help="with --ray: CPUs (and torch threads) per replica (default: this machine's cores shared out)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_device_args(s)
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="parameters, visual tokens and cache sizes of a model")
    src = i.add_mutually_exclusive_group()
    src.add_argument("--preset")
    src.add_argument("--checkpoint")
    src.add_argument("--list", action="store_true", help="list the presets")
    src.add_argument("--machine", action="store_true",
                     help="this machine: CPU features, float32 and bfloat16 matmul rates, weight-streaming bandwidth")
    i.add_argument("--remeasure", action="store_true", help="with --machine: measure again instead of reading the cache")
    i.add_argument("--image", metavar="WxH", help="the image the per-image figures are for (default: the crop size)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train a model (contrastive, align or instruct stage)")
    t.add_argument("--config", help="a training YAML (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the config's")
    _add_device_args(t, training=True)
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("arena", help="train fusion strategies on the same data and budget, compare them")
    a.add_argument("--config", help="arena YAML (default: the packaged omnifuse/configs/arena.yaml)")
    a.add_argument("--quick", action="store_true", help="a few steps per strategy, to check the pipeline")
    a.add_argument("--out-dir", help="where report.md and the plots go (default: runs/arena)")
    a.add_argument("--seeds", type=int, default=1,
                   help="train every strategy this many times (seeds seed, seed+1, ...): means, spreads, pooled intervals")
    _add_device_args(a, training=True)
    a.set_defaults(func=cmd_arena)

    from omnifuse.planner.command import add_plan_parser

    add_plan_parser(sub)

    d = sub.add_parser("demo", help="the main job: the fusion arena with its default config")
    d.add_argument("--quick", action="store_true", help="a few steps per strategy")
    d.add_argument("--out-dir", help="where report.md and the plots go (default: runs/arena)")
    _add_device_args(d, training=True)
    d.set_defaults(func=cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """omnifuse's own warnings (a default standing in for a missing setting) as one line."""
    from omnifuse.config import LoudDefaultWarning

    if issubclass(category, LoudDefaultWarning):
        print(f"omnifuse: warning: {message}", file=sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    from omnifuse.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except USER_ERRORS as e:  # bad input: one clear line, no traceback
        print(f"omnifuse: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
