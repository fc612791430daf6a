"""Token merging (ToMe) in a vision encoder: encoder latency and tokens per image at r = 0 (the
unmerged model), and r merging about 25% and 50% of the tokens, in one run on the same weights
(float32, CPU).

    python benchmarks/tome.py [--encoder vit-l-336 | vit-b-224] [--batch 1] [--repeats 5]
    python benchmarks/tome.py --checkpoint DIR     # a trained omnifuse model's encoder, diagnostic images

The default encoder is LLaVA-1.5's CLIP ViT-L/14 at 336 px (576 patches plus a class token; the
23 layers up to the penultimate, whose output LLaVA reads) with random weights: ToMe needs no
training, and speed does not depend on the values. ToMe merges r tokens in each of those layers;
r = round(share x patches / layers). "patch cosine" is, averaged over every patch, the cosine
similarity between the unmerged encoder's output at that patch and the merged token that holds it
(ToMe's source tracking): how much of each patch's feature merging keeps. On random weights
neighbouring tokens are alike and it stays near 1; ``--checkpoint`` measures it on a trained
encoder and the images it was trained on.
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
from omnifuse.planner.resources import machine_line

ENCODERS = {
    # CLIP ViT-L/14-336 as LLaVA-1.5 reads it (feature layer -2)
    "vit-l-336": VisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=4096, activation="quick_gelu", feature_layer=-2),
    # CLIP ViT-B/16-224, a quicker run
    "vit-b-224": VisionConfig(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                              intermediate_size=3072, activation="quick_gelu", feature_layer=-2),
}


def random_encoder(v: VisionConfig) -> VisionTransformer:
    torch.manual_seed(0)
    encoder = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, dim=v.hidden_size,
                                num_layers=v.num_layers, num_heads=v.num_heads, hidden=v.intermediate_size,
                                activation=v.activation, feature_layers=v.feature_layers).eval()
    for p in encoder.parameters():  # CLIP-like spread, so tokens differ and similarities mean something
        p.data.normal_(0, 0.02)
    encoder.position_embedding.data.normal_(0, 0.5)
    return encoder


def trained_encoder(folder: str, n: int):
    """A checkpoint's vision encoder and config, and ``n`` diagnostic test images as its pixels."""
    from omnifuse.checkpoint import load_checkpoint
    from omnifuse.training.diagnostic import IMAGE_SKILLS, DiagnosticSet

    model = load_checkpoint(folder).eval()
    v = model.config.vision
    images = DiagnosticSet("test", n, image_size=model.config.image.image_size, skills=IMAGE_SKILLS)
    pixels = torch.cat([model.image_processor(images[i].images[0]).pixel_values for i in range(n)])
    return model.encoders["image"], v, pixels


def patch_cosine(plain: torch.Tensor, merged: torch.Tensor, source: torch.Tensor, cls: int) -> float:
    """Mean cosine between each patch's unmerged output and the merged token holding it."""
    back = source[:, cls:, cls:].transpose(1, 2) @ merged  # (N, patches, D): each patch's merged token
    return F.cosine_similarity(back, plain, dim=-1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", choices=list(ENCODERS), default="vit-l-336")
    ap.add_argument("--checkpoint", help="an omnifuse checkpoint folder: its vision encoder on diagnostic images")
    ap.add_argument("--batch", type=int, default=1, help="images per encoder call")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    console = Console(width=120)
    console.print(machine_line())
    if args.checkpoint:
        encoder, v, pixels = trained_encoder(args.checkpoint, max(args.batch, 32))
        name = args.checkpoint
    else:
        v, name = ENCODERS[args.encoder], args.encoder
        encoder = random_encoder(v)
        pixels = torch.randn(args.batch, 3, v.image_size, v.image_size)
    if v.feature_select != "default" or not v.use_cls:
        raise SystemExit("this benchmark reads patch features without the class token (feature_select default)")
    side = v.image_size // v.patch_size
    patches, layers = side * side, v.layers_run
    console.print(f"encoder {name}: {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M parameters, "
                  f"{patches} patches + class token, {layers} layers run; {pixels.shape[0]} image(s) per call, "
                  f"{torch.get_num_threads()} threads, median of {args.repeats}")
    settings = [("unmerged", 0)] + [(f"{share:.0%} merged", round(share * patches / layers)) for share in (0.25, 0.5)]
    rows, plain = [], None
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
            if r == 0:
                plain, cosine = out, 1.0
            else:
                merged, source = encoder(pixels, sources=True)
                cosine = patch_cosine(plain, merged, source, cls=1)
            rows.append((label, r, tokens, statistics.median(times) / pixels.shape[0], cosine))
        encoder.merge_tokens = 0
    base = rows[0][3]
    table = Table(title=f"ToMe on {name}: encoder latency and tokens per image")
    for col in ("setting", "r / layer", "tokens / image", "vs unmerged", "encoder ms / image", "speed-up",
                "patch cosine"):
        table.add_column(col, justify="right")
    for label, r, tokens, t, cos in rows:
        table.add_row(label, str(r), str(tokens), f"{tokens / rows[0][2]:.2f}x", f"{1000 * t:.1f}",
                      f"{base / t:.2f}x", f"{cos:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
