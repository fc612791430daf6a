"""Token merging (ToMe) in a LLaVA-1.5-sized vision encoder: encoder latency and tokens per image
at r = 0 (the unmerged model), and r merging about 25% and 50% of the tokens, in one run on the
same weights (float32, CPU, random weights: ToMe needs no training, and speed does not depend on
the values).

    python benchmarks/tome.py [--encoder vit-l-336 | vit-b-224] [--batch 1] [--repeats 5]

The default encoder is LLaVA-1.5's CLIP ViT-L/14 at 336 px (576 patches plus a class token; the
23 layers up to the penultimate, whose output LLaVA reads). ToMe merges r tokens in each of those
layers; r = round(share x patches / layers). Also printed: how far the merged encoder's mean
feature moves from the unmerged one (cosine similarity), a sanity check that merging averages
similar tokens rather than scrambling them.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from omnifuse.config import VisionConfig
from omnifuse.connectors import encoder_tokens
from omnifuse.encoders import VisionTransformer

ENCODERS = {
    # CLIP ViT-L/14-336 as LLaVA-1.5 reads it (feature layer -2)
    "vit-l-336": VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=4096, activation="quick_gelu", feature_layer=-2),
    # CLIP ViT-B/16-224, a quicker run
    "vit-b-224": VisionConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                              intermediate_size=3072, activation="quick_gelu", feature_layer=-2),
}


def build(v: VisionConfig) -> VisionTransformer:
    return VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, dim=v.hidden_size,
                             num_layers=v.num_layers, num_heads=v.num_heads, hidden=v.intermediate_size,
                             activation=v.activation, feature_layers=v.feature_layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", choices=list(ENCODERS), default="vit-l-336")
    ap.add_argument("--batch", type=int, default=1, help="images per encoder call")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    console = Console()
    v = ENCODERS[args.encoder]
    torch.manual_seed(0)
    encoder = build(v).eval()
    for p in encoder.parameters():  # CLIP-like spread, so tokens differ and similarities mean something
        p.data.normal_(0, 0.02)
    encoder.position_embedding.data.normal_(0, 0.5)
    side = v.image_size // v.patch_size
    patches, layers = side * side, v.layers_run
    pixels = torch.randn(args.batch, 3, v.image_size, v.image_size)
    console.print(f"encoder {args.encoder}: {sum(p.numel() for p in encoder.parameters()) / 1e6:.0f}M parameters, "
                  f"{patches} patches + class token, {layers} layers run; batch {args.batch}, "
                  f"{torch.get_num_threads()} threads, median of {args.repeats}")
    settings = [("unmerged", 0)] + [(f"{share:.0%} merged", round(share * patches / layers)) for share in (0.25, 0.5)]
    rows, reference = [], None
    with torch.inference_mode():
        for label, r in settings:
            encoder.merge_tokens = r
            out = encoder(pixels)  # warm-up (and the output)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                encoder(pixels)
                times.append(time.perf_counter() - t0)
            tokens = encoder_tokens(dataclasses.replace(v, merge_tokens=r), (side, side))[0]
            assert out.shape[1] == tokens, (out.shape, tokens)  # the count the processor uses
            mean = out.mean(dim=1)
            reference = mean if reference is None else reference
            rows.append((label, r, tokens, statistics.median(times), F.cosine_similarity(mean, reference).mean().item()))
    base = rows[0][3]
    table = Table(title=f"ToMe on {args.encoder}: encoder latency and tokens per image")
    for col in ("setting", "r per layer", "tokens / image", "tokens vs unmerged", "encoder ms / image",
                "speed-up", "mean-feature cosine"):
        table.add_column(col, justify="right")
    for label, r, tokens, t, cos in rows:
        table.add_row(label, str(r), str(tokens), f"{tokens / rows[0][2]:.2f}x", f"{1000 * t / args.batch:.0f}",
                      f"{base / t:.2f}x", f"{cos:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
