"""``omnifuse plan --preset NAME --measure``: build the preset, run one request, and set what the
planner predicts beside what happened: visual tokens, cache bytes, FLOPs (counted by
``torch.utils.flop_counter.FlopCounterMode``) and latency on this machine."""

from __future__ import annotations

import time
from typing import Any

import torch

from omnifuse.config import ModelConfig

__all__ = ["MEASURE_MAX_PARAMETERS", "measure_request"]

# --measure builds the model in float32 here; beyond this it would not fit a laptop's memory.
MEASURE_MAX_PARAMETERS = 2_000_000_000


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode's attention rule (two matmuls over the query x key rectangle) for the CPU
    kernel, which torch's flop registry lists only for its CUDA kernels. Query heads count, so
    grouped-query attention is priced by the heads that do the work."""
    b, h, s_q, d = query
    return 4 * b * h * s_q * key[2] * d


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops})


def _noise_image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _noise_audio(seconds: float, rate: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).uniform(-0.5, 0.5, round(seconds * rate)).astype(np.float32), rate


def _noise_video(seconds: float, width: int, height: int, seed: int, rate: int = 10) -> bytes:
    """An MP4 of noise frames at ``rate`` fps lasting ``seconds`` (made with PyAV, in memory)."""
    import io
    from fractions import Fraction

    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, rate)
        for i in range(max(1, round(seconds * rate))):
            pixels = rng.integers(0, 256, (stream.height, stream.width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@torch.inference_mode()
def measure_request(config: ModelConfig, image_sizes: list[tuple[int, int]], text_tokens: int,
                    output_tokens: int, repeats: int = 3, audio_seconds: float = 0.0, video_seconds: float = 0.0,
                    video_size: tuple[int, int] = (64, 64), fps: float | None = None) -> dict[str, Any]:
    """Run one request (random weights, noise images, a noise clip of ``audio_seconds``, a noise
    video of ``video_seconds``, ``text_tokens`` prompt tokens) and return the measured counts:
    media tokens (images, then the clip, then the video), context tokens, cache bytes, prefill and
    decode FLOPs, and the median prefill and decode latency."""
    from omnifuse.model import build_model
    from omnifuse.nn.packed import pack_linears
    from omnifuse.processing.prompt import MediaShape, PromptLayout
    from omnifuse.processing.text import load_tokenizer

    torch.manual_seed(0)
    model = build_model(config).eval()
    layout = PromptLayout.for_model(config, load_tokenizer(config.text))
    processor = model.image_processor
    images = [processor(_noise_image(w, h, i)) for i, (w, h) in enumerate(image_sizes)]
    if audio_seconds:
        images.append(model.processors["audio"](_noise_audio(audio_seconds, config.audio.sampling_rate, 7)))
    if video_seconds:
        images.append(model.processors["video"](_noise_video(video_seconds, *video_size, 8), fps=fps))
    features = model.encode_media(images)
    visual = [int(f.shape[0]) for f in features]
    placeholders = set(model.placeholder_ids.values())
    text = torch.randint(1, config.decoder.vocab_size, (text_tokens,)).tolist()
    ordinary = [t for t in range(1, config.decoder.vocab_size) if t not in placeholders]
    text = [t if t not in placeholders else ordinary[t % len(ordinary)] for t in text]  # placeholders may be adjacent ids
    # Media in front of a prompt without placeholders (PromptLayout.place_media: images, then audio,
    # then video), after the first id, which stands for bos; each item's span is one position per
    # media token (early) or one per item (cross), with the checkpoint's markers (text.image_span).
    spans = [layout.item_span(MediaShape(n, getattr(item, "tiles", (1, 1))), item.modality)
             for item, n in zip(images, visual)]
    ids = text[:1] + [i for span in spans for i in span] + text[1:]
    prompt = torch.tensor([ids])
    total = len(ids) + output_tokens

    def prefill(cache):
        return model(prompt, images=[images], cache=cache, last_only=True)

    def decode(cache):
        return model(torch.tensor([[1]]), torch.ones(1, 1, dtype=torch.long), cache=cache, last_only=True)

    cache = model.new_cache(1, total)
    with flop_counter() as counter:
        prefill(cache)
    prefill_flops = counter.get_total_flops()
    with flop_counter() as counter:
        decode(cache)
    decode_flops = counter.get_total_flops()
    cache_bytes = {"self_attention": cache.self_attn.nbytes,  # the cache held while decoding
                   "cross_attention_decode": cache.cross.nbytes if cache.cross is not None else 0}

    pack_linears(model)  # latency as `omnifuse generate` runs it
    prefill_s, decode_s = [], []
    for _ in range(repeats + 1):  # the first round warms up (packing, allocator) and is dropped
        cache = model.new_cache(1, total)
        t0 = time.perf_counter()
        prefill(cache)
        prefill_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        steps = max(1, min(output_tokens, 16))
        for _ in range(steps):
            decode(cache)
        decode_s.append((time.perf_counter() - t0) / steps)
    prefill_s, decode_s = prefill_s[1:], decode_s[1:]
    return {
        "visual_tokens": visual,
        "context_tokens": len(ids),
        "kv_cache_bytes": cache_bytes["self_attention"] + cache_bytes["cross_attention_decode"],
        "kv_cache_bytes_by_kind": cache_bytes,
        "prefill_flops": prefill_flops,
        "decode_flops_per_token": decode_flops,
        "prefill_seconds": sorted(prefill_s)[len(prefill_s) // 2],
        "decode_seconds_per_token": sorted(decode_s)[len(decode_s) // 2],
    }
