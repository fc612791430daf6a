"""Llama 3.2 Vision checkpoints in Hugging Face layout (``MllamaForConditionalGeneration``).

Tiled vision encoder (``encoders/mllama_vision.py``) -> linear projector -> a Llama decoder whose
layer list holds gated cross-attention layers at ``cross_attention_layers``. omnifuse keeps those
as ``cross_layers`` placed before the self-attention layer that follows them, so HF stack index s
of the j-th cross layer becomes omnifuse index s - j; a self-attention layer at stack index s
becomes s - (cross layers before it). The reference's cross-attention mask (latest image group,
padded tiles cached but not attended, tokens before any image still adding attention output) is
reproduced through ``FusionConfig`` settings, not special code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omnifuse.checkpoint import CheckpointError
from omnifuse.config import (
    ConnectorConfig,
    DecoderConfig,
    FusionConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from omnifuse.encoders.mllama_vision import mllama_vision_kwargs, supported_aspect_ratios
from omnifuse.interop.hf import (
    KeyMap,
    build_on_meta,
    check_pixel_steps,
    llama_decoder_kwargs,
    load_mapped,
    per_channel,
    placeholder_text,
    read_image_processor_config,
    warn_processor_defaults,
)

__all__ = ["load_mllama", "mllama_config", "mllama_key_map", "normalise_mllama_key"]

# The published Llama 3.2 Vision processors normalise with CLIP's mean and std ...
_PUBLISHED_MEAN = (0.48145466, 0.4578275, 0.40821073)
_PUBLISHED_STD = (0.26862954, 0.26130258, 0.27577711)
# ... while transformers' MllamaImageProcessor class defaults, which the reference uses for keys a
# saved processor leaves out, are 0.5 / 0.5 (IMAGENET_STANDARD).
_PROCESSOR_DEFAULTS = dict(resample=2, size={"height": 224, "width": 224}, do_resize=True, do_pad=True,
                           do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=(0.5, 0.5, 0.5),
                           image_std=(0.5, 0.5, 0.5), max_image_tiles=4)


def _image_config(folder: Path, tile: int, max_tiles: int) -> ImageConfig:
    """The reference processor's settings as an ImageConfig; a folder with none gets the published
    Llama 3.2 Vision settings at the encoder's tile size, with a warning."""
    pre, source = read_image_processor_config(folder)
    if source is None:
        warn_processor_defaults(folder, f"the published Llama 3.2 Vision settings ({tile} px tiles, up to "
                                        f"{max_tiles}, mean {_PUBLISHED_MEAN}, std {_PUBLISHED_STD})")
        return ImageConfig(mode="tiles", image_size=tile, max_tiles=max_tiles, overview=False, pad_tiles=True,
                           mean=_PUBLISHED_MEAN, std=_PUBLISHED_STD)
    pre = {**_PROCESSOR_DEFAULTS, **{k: v for k, v in pre.items() if v is not None}}
    where = f"{folder / source}"
    size = pre["size"]
    side = size.get("height") if isinstance(size, dict) else size
    if not isinstance(side, int) or (isinstance(size, dict) and size.get("width", side) != side):
        raise CheckpointError(f"{where}: Mllama tiles must be square, size is {size}")
    if side != tile:
        raise CheckpointError(f"{where}: tiles are {side} px but the vision encoder takes {tile} px tiles")
    check_pixel_steps(pre, where, "Mllama", (2, "bilinear"), ("do_resize", "do_pad", "do_rescale", "do_normalize"))
    if pre["max_image_tiles"] != max_tiles:
        raise CheckpointError(f"{where}: max_image_tiles {pre['max_image_tiles']} differs from the vision "
                              f"encoder's max_num_tiles {max_tiles}")
    return ImageConfig(mode="tiles", image_size=side, max_tiles=max_tiles, overview=False, pad_tiles=True,
                       mean=per_channel(pre["image_mean"], f"{where}: image_mean"),
                       std=per_channel(pre["image_std"], f"{where}: image_std"))


def mllama_config(hf: dict[str, Any], folder: str | Path) -> ModelConfig:
    """The omnifuse config of an Mllama ``config.json`` (its image token id among the placeholders)."""
    folder = Path(folder)
    vision_hf = hf.get("vision_config") or {}
    text = hf.get("text_config") or {}
    try:
        vk = mllama_vision_kwargs(vision_hf)
    except CheckpointError as e:
        raise CheckpointError(f"unsupported Mllama vision config: {e}") from None
    max_tiles = vk["max_num_tiles"]
    ratios = vision_hf.get("supported_aspect_ratios")
    if ratios is not None and [tuple(r) for r in ratios] != supported_aspect_ratios(max_tiles):
        raise CheckpointError(f"supported_aspect_ratios {ratios} differ from the standard list for {max_tiles} tiles")
    cross_stack = sorted(int(i) for i in text.get("cross_attention_layers", [3, 8, 13, 18, 23, 28, 33, 38]))
    n_stack = text.get("num_hidden_layers", 40)
    decoder = llama_decoder_kwargs({**text, "num_hidden_layers": n_stack - len(cross_stack)})
    decoder["extra_embeddings"] = 8  # MllamaTextModel: nn.Embedding(vocab_size + 8, ...)
    image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 128256)))
    vision_dim = vk["dim"] * (1 + len(vk["intermediate_layers"]))
    if vision_hf.get("vision_output_dim", vision_dim) != vision_dim:
        raise CheckpointError(f"vision_output_dim {vision_hf['vision_output_dim']} != hidden_size x (1 + "
                              f"intermediate layers) = {vision_dim}")
    config = ModelConfig(
        name=str(folder.name),
        vision=VisionConfig(
            type="mllama", image_size=vk["image_size"], patch_size=vk["patch_size"], hidden_size=vk["dim"],
            num_layers=vk["num_layers"], num_global_layers=vk["num_global_layers"], num_heads=vk["num_heads"],
            intermediate_size=vk["hidden"], intermediate_layers=tuple(vk["intermediate_layers"]),
            max_num_tiles=max_tiles, num_channels=vk.get("num_channels", 3), norm_eps=vk.get("eps", 1e-5),
            activation=vk.get("activation", "gelu"), use_cls=True, feature_select="full", pre_norm=False,
        ),
        image=_image_config(folder, vk["image_size"], max_tiles),
        connector=ConnectorConfig(type="linear", bias=True),
        fusion=FusionConfig(type="cross", cross_attention_layers=tuple(s - j for j, s in enumerate(cross_stack)),
                            cross_attention_span="latest", text_before_media="attend_all"),
        decoder=DecoderConfig(**decoder),
        text=TextConfig(tokenizer="file", placeholder_tokens={"image": placeholder_text(folder, image_token_id)},
                        placeholder_ids={"image": image_token_id},
                        bos_token="<|begin_of_text|>", bos_after_leading_images=True),
    )
    return config


def normalise_mllama_key(key: str) -> str:
    key = re.sub(r"^model\.(vision_model|language_model|multi_modal_projector)\.", r"\1.", key)
    key = re.sub(r"^language_model\.model\.", "language_model.", key)
    return re.sub(r"^language_model\.lm_head\.", "lm_head.", key)


def mllama_key_map(cross_stack: list[int], n_stack: int) -> KeyMap:
    rules: KeyMap = [
        (r"vision_model\.(.+)", r"encoders.image.\1"),
        (r"multi_modal_projector\.(weight|bias)", r"connectors.image.linear.\1"),
        (r"language_model\.embed_tokens\.weight", "decoder.embed_tokens.weight"),
        (r"language_model\.norm\.weight", "decoder.norm.weight"),
        (r"lm_head\.weight", "decoder.lm_head.weight"),
        (r".*rotary_emb\.inv_freq", None),
    ]
    cross = set(cross_stack)
    for s in range(n_stack):
        before = sum(1 for c in cross_stack if c < s)
        if s in cross:
            k = s - before
            p = rf"language_model\.layers\.{s}\."
            rules += [
                (p + r"cross_attn_attn_gate", f"decoder.cross_layers.{k}.attn_gate.gate"),
                (p + r"cross_attn_mlp_gate", f"decoder.cross_layers.{k}.mlp_gate.gate"),
                (p + r"(.+)", rf"decoder.cross_layers.{k}.\1"),
            ]
        else:
            rules.append((rf"language_model\.layers\.{s}\.(.+)", rf"decoder.layers.{s - before}.\1"))
    return rules


def load_mllama(folder: str | Path, hf: dict[str, Any], device: str = "cpu"):
    config = mllama_config(hf, folder)
    text = hf.get("text_config") or {}
    cross_stack = sorted(int(i) for i in text.get("cross_attention_layers", [3, 8, 13, 18, 23, 28, 33, 38]))
    model = build_on_meta(config)
    model = load_mapped(model, folder, mllama_key_map(cross_stack, text.get("num_hidden_layers", 40)), normalise_mllama_key, device=device)
    return model.eval()
