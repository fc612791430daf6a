"""Decode throughput of a ~130M-parameter LLaVA-style model at batch 1 and batch 8 (float32, CPU).

    python benchmarks/decode_speed.py [--preset NAME] [--image WxH] [--batches 1,8] [--new-tokens 64] [--threads N]

Prints prefill latency for one image + 32 text tokens and decode tokens/s; this is omnifuse alone
(the comparison with transformers is benchmarks/vs_transformers.py). ``--preset`` runs a named
preset at its real size with random weights instead (e.g. ``smolvlm-256m``).
"""

from __future__ import annotations

import argparse
import time

import torch

from omnifuse.config import (
    ConnectorConfig,
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from omnifuse.inference import SamplingConfig, generate_stream
from omnifuse.model import build_model
from omnifuse.nn.packed import pack_linears
from omnifuse.planner.resources import machine_line
from omnifuse.presets import get_preset

LLAVA_130M = ModelConfig(
    name="llava-130m",
    vision=VisionConfig(image_size=224, patch_size=16, hidden_size=384, num_layers=6, num_heads=6,
                        intermediate_size=1536, activation="quick_gelu", feature_layer=-2),
    image=ImageConfig(mode="fixed", image_size=224, resize="pad"),
    connector=ConnectorConfig(type="mlp"),
    fusion=FusionConfig(type="early"),
    decoder=DecoderConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                          intermediate_size=2048, max_position=2048),
    text=TextConfig(tokenizer="file", placeholder_ids={"image": 31999}),  # ids only: no tokenizer is read
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--preset", help="a preset instead of the built-in 130M LLaVA-style model")
    ap.add_argument("--image", default="320x240", help="the image size, WxH (default 320x240)")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes (default 1,8)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    torch.manual_seed(0)
    config = get_preset(args.preset) if args.preset else LLAVA_130M
    model = build_model(config).eval()
    n_params = sum(p.numel() for p in model.parameters())  # before packing turns weights into buffers
    pack_linears(model)  # as Pipeline does for inference
    proc = model.image_processor
    from PIL import Image

    width, height = (int(x) for x in args.image.lower().split("x"))
    image = proc(Image.new("RGB", (width, height), (120, 60, 200)))
    placeholder = config.text.placeholder_ids["image"]
    prompt = [1] + [placeholder] * image.num_tokens + list(range(100, 132))
    cfg = SamplingConfig(max_new_tokens=args.new_tokens)
    print(f"model: {config.name}, {n_params / 1e6:.1f}M parameters, a {width}x{height} image as {image.num_tokens} "
          f"visual tokens, threads={torch.get_num_threads()}")
    with torch.inference_mode():
        for _ in range(2):  # warm-up, then measure
            t0 = time.perf_counter()
            model(torch.tensor([prompt]), images=[[image]], cache=model.new_cache(1, len(prompt) + 1), last_only=True)
            prefill = time.perf_counter() - t0
    print(f"prefill (1 image + 32 text tokens, {len(prompt)} positions): {prefill * 1000:.1f} ms")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [prompt] * batch
        images = [[image]] * batch
        for _ in range(2):
            times = []
            t_prev = time.perf_counter()
            for _step in generate_stream(model, prompts, images, cfg):
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
        decode = sum(times[1:])  # times[0] includes the prefill
        tps = batch * (len(times) - 1) / decode
        print(f"batch {batch}: decode {tps:.1f} tokens/s ({decode / (len(times) - 1) * 1000:.2f} ms/step)")


if __name__ == "__main__":
    main()
