"""Architectures of published models that have no omnifuse preset, from their reference configs.

Each entry names its source. Where a part is simplified the entry's notes say how; the totals
are checked against the published parameter counts in the tests.
"""

from __future__ import annotations

import dataclasses

from omnifuse.planner.arch import (
    Architecture,
    ConnectorArch,
    DecoderArch,
    EncoderArch,
    from_model_config,
)
from omnifuse.presets import get_preset

__all__ = ["PUBLISHED"]

_SIGLIP_SO400M = {"hidden": 1152, "layers": 27, "heads": 16, "intermediate": 4304, "patch": 14, "cls_tokens": 0}
_QWEN2_7B = DecoderArch(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                        vocab=152064, qkv_bias=True)
# Qwen2-VL: a Conv3d patch embedding over 2 frames (an image is repeated), 2x2 merge into an MLP.
_QWEN_STEM = ((3 * 2, 1280, 14, 14),)
_QWEN_MERGER = ConnectorArch(kind="mlp", in_dim=1280, out_dim=3584, hidden=5120, merge=4)


PUBLISHED: dict[str, Architecture] = {
    "llava-next-7b": dataclasses.replace(
        from_model_config(get_preset("llava-1.5-7b")), name="llava-next-7b",
        source="llava-hf/llava-v1.6-vicuna-7b-hf: the llava-1.5-7b architecture run on 1 + grid crops"),
    "qwen2-vl-7b": Architecture(
        name="qwen2-vl-7b", decoder=_QWEN2_7B,
        encoder=EncoderArch(hidden=1280, layers=32, heads=16, intermediate=5120, patch=14, image_size=224,
                            cls_tokens=0, stem=_QWEN_STEM, dynamic=True),
        connector=_QWEN_MERGER,
        source="Qwen/Qwen2-VL-7B-Instruct config.json; transformers models/qwen2_vl"),
    "qwen2.5-vl-7b": Architecture(
        name="qwen2.5-vl-7b", decoder=_QWEN2_7B,
        encoder=EncoderArch(hidden=1280, layers=32, heads=16, intermediate=3420, patch=14, image_size=224,
                            cls_tokens=0, mlp_matrices=3, stem=_QWEN_STEM, dynamic=True),
        connector=_QWEN_MERGER,
        source="Qwen/Qwen2.5-VL-7B-Instruct config.json; transformers models/qwen2_5_vl",
        notes=("window attention (112 px windows) in 28 of 32 encoder layers is priced as full attention",)),
    "idefics3-8b": Architecture(
        name="idefics3-8b",
        decoder=DecoderArch(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                            vocab=128259),
        encoder=EncoderArch(image_size=364, **_SIGLIP_SO400M),
        connector=ConnectorArch(kind="linear", in_dim=1152, out_dim=4096, merge=4, bias=False),
        source="HuggingFaceM4/Idefics3-8B-Llama3 config.json; transformers models/idefics3"),
    "smolvlm-256m": Architecture(
        name="smolvlm-256m",
        decoder=DecoderArch(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                            vocab=49280),
        encoder=EncoderArch(hidden=768, layers=12, heads=12, intermediate=3072, patch=16, image_size=512,
                            cls_tokens=0),
        connector=ConnectorArch(kind="linear", in_dim=768, out_dim=576, merge=16, bias=False),
        source="HuggingFaceTB/SmolVLM-256M-Instruct config.json"),
    "smolvlm-instruct": Architecture(
        name="smolvlm-instruct",
        decoder=DecoderArch(hidden=2048, layers=24, heads=32, kv_heads=32, head_dim=64, intermediate=8192,
                            vocab=49155),
        encoder=EncoderArch(image_size=384, **_SIGLIP_SO400M),
        connector=ConnectorArch(kind="linear", in_dim=1152, out_dim=2048, merge=9, bias=False),
        source="HuggingFaceTB/SmolVLM-Instruct config.json"),
    "gemma-3-27b": Architecture(
        name="gemma-3-27b",
        decoder=DecoderArch(hidden=5376, layers=62, heads=32, kv_heads=16, head_dim=128, intermediate=21504,
                            vocab=262208, tied=True, window=1024, global_every=6),
        encoder=EncoderArch(image_size=896, **_SIGLIP_SO400M),
        connector=ConnectorArch(kind="pool_linear", in_dim=1152, out_dim=5376, merge=16, bias=False),
        source="google/gemma-3-27b-it config.json; transformers models/gemma3",
        notes=("5 of every 6 layers attend to a 1024-token sliding window",)),
    "blip-2": Architecture(
        name="blip-2",
        decoder=DecoderArch(hidden=2560, layers=32, heads=32, kv_heads=32, head_dim=80, intermediate=10240,
                            vocab=50272, tied=True, mlp_matrices=2, qkv_bias=True),
        encoder=EncoderArch(hidden=1408, layers=39, heads=16, intermediate=6144, patch=14, image_size=224),
        connector=ConnectorArch(kind="qformer", in_dim=1408, out_dim=2560, hidden=768, queries=32, layers=12),
        source="Salesforce/blip2-opt-2.7b config.json (EVA ViT-g without its last layer; Q-Former; OPT-2.7B)",
        notes=("OPT's learned positions and biases outside attention are left out (<0.2% of parameters)",)),
    "idefics-9b": Architecture(
        name="idefics-9b",
        decoder=DecoderArch(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008,
                            vocab=32002, cross_layers=8, cross_kv_dim=1280, cross_qk_norm=False),
        encoder=EncoderArch(hidden=1280, layers=32, heads=16, intermediate=5120, patch=14, image_size=224),
        connector=ConnectorArch(kind="perceiver", in_dim=1280, out_dim=4096, hidden=1280, queries=64, layers=6,
                                attention=16 * 96, bias=False, project=False),
        source="HuggingFaceM4/idefics-9b config.json (LLaMA-7B + 2 extra tokens, a gated cross-attention block "
               "every 4th layer; CLIP ViT-H/14; perceiver of 6 layers, 16 heads of 96, at the tower's width)"),
}
