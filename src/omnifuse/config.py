"""Model configuration: frozen, validated dataclasses that round-trip to JSON and YAML.

Configs are data (ARCHITECTURE.md, contract 1). Each dataclass settles its derived fields once in
``__post_init__`` and asserts its invariants there; nothing edits a config afterwards.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from omnifuse.errors import ConfigError

__all__ = [
    "AudioConfig",
    "ConfigError",
    "ConnectorConfig",
    "DecoderConfig",
    "FrozenMap",
    "FusionConfig",
    "ImageConfig",
    "LayerSpec",
    "LoudDefaultWarning",
    "ModelConfig",
    "TextConfig",
    "VideoConfig",
    "VisionConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_yaml",
    "save_config",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LoudDefaultWarning(UserWarning):
    """A setting was missing and a default stands in for it; the message names both. The CLI prints
    it as one ``omnifuse: warning:`` line."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: derived fields are settled once


class FrozenMap(dict):
    """A dict that cannot change: the mapping fields of frozen configs (a config is never edited)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config mappings cannot be changed; build a new config with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self) -> tuple:
        return type(self), (dict(self),)


@dataclass(frozen=True)
class VisionConfig:
    """A ViT image encoder (CLIP-style: patch conv, optional CLS, learned positions, pre-norm)."""

    image_size: int = 224  # the resolution the position embedding was learned at
    patch_size: int = 14
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_channels: int = 3
    use_cls: bool = True
    activation: str = "gelu"  # gelu | quick_gelu (CLIP) | gelu_tanh (SigLIP)
    norm_eps: float = 1e-5
    pre_norm: bool = True  # CLIP's pre_layrnorm on the embeddings
    patch_bias: bool = False
    qkv_bias: bool = True
    # Which hidden state feeds the connector: 0 is the embedding output, -1 the last layer,
    # -2 the one before (LLaVA). A tuple concatenates several layers along the channel axis.
    feature_layer: int | tuple[int, ...] = -1
    # "default" drops the CLS token from the features (LLaVA), "full" keeps it.
    feature_select: str = "default"
    # "vit": the CLIP-style encoder above, one crop at a time. "mllama": Llama 3.2 Vision's tiled
    # encoder (all tiles of an image attend jointly; aspect-ratio and gated position embeddings,
    # a gated global stack, channels = hidden x (1 + len(intermediate_layers))).
    type: str = "vit"
    # "patch": one patch_size x patch_size projection (ViT, CLIP). "conv": a convolutional stem of
    # stride-2 layers (Xiao et al. 2021), for encoders trained from scratch; patch_size a power of 2.
    stem: str = "patch"
    num_global_layers: int = 0
    intermediate_layers: tuple[int, ...] = ()
    max_num_tiles: int = 4
    # Token merging (ToMe, Bolya et al. 2023): each encoder layer merges up to this many of its
    # most similar tokens into their matches (r; 0 = off). Needs no training, so it can be set at
    # inference on any "vit" encoder; the token counts stay exact (encoders/tome.py).
    merge_tokens: int = 0
    # A LayerNorm on the features handed on (SigLIP's post_layernorm, as Idefics3 and SmolVLM read
    # the last layer); needs a single feature_layer.
    post_norm: bool = False
    # Where the class token goes: "first" (CLIP) or "last", after the patches (Llama 4).
    cls_position: str = "first"
    # > 0: 2-D rotary positions (patch column and row) in every layer's attention, at this base
    # (Llama 4: 10000); 0: none.
    rope_theta: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "num_channels"):
            _check(getattr(self, name) > 0, f"vision.{name} must be positive, got {getattr(self, name)}")
        _check(self.image_size % self.patch_size == 0,
               f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _check(self.activation in ("gelu", "quick_gelu", "gelu_tanh"), f"vision.activation {self.activation!r} unknown")
        _check(self.feature_select in ("default", "full"),
               f"vision.feature_select must be 'default' or 'full', got {self.feature_select!r}")
        if isinstance(self.feature_layer, list):
            _set(self, "feature_layer", tuple(self.feature_layer))
        _set(self, "intermediate_layers", tuple(int(i) for i in self.intermediate_layers))
        bad = [i for i in self.intermediate_layers if not -self.num_layers <= i < self.num_layers]
        _check(not bad, f"vision.intermediate_layers {bad} out of range for num_layers {self.num_layers}")
        _check(self.type in ("vit", "mllama"), f"vision.type must be vit or mllama, got {self.type!r}")
        _check(self.stem in ("patch", "conv"), f"vision.stem must be patch or conv, got {self.stem!r}")
        _check(self.cls_position in ("first", "last"), f"vision.cls_position must be first or last, got {self.cls_position!r}")
        _check(self.rope_theta >= 0, f"vision.rope_theta must be >= 0 (0: no 2-D rotary positions), got {self.rope_theta}")
        _check(not self.rope_theta or (self.hidden_size // self.num_heads) % 4 == 0,
               f"vision.rope_theta needs a head width divisible by 4, got {self.hidden_size // self.num_heads}")
        if self.stem == "conv":
            _check(self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0,
                   f"vision.stem conv needs a power-of-two patch_size, got {self.patch_size}")
        if self.type == "mllama":
            _check(self.use_cls and self.feature_select == "full",
                   "vision.type mllama keeps its class token: use_cls=true, feature_select='full'")
        layers = self.feature_layers
        for i in layers:
            _check(-(self.num_layers + 1) <= i <= self.num_layers,
                   f"vision.feature_layer {i} is outside the {self.num_layers + 1} hidden states")
        _check(self.merge_tokens >= 0, f"vision.merge_tokens must be >= 0, got {self.merge_tokens}")
        _check(not self.post_norm or (self.type == "vit" and len(layers) == 1),
               "vision.post_norm needs a vit encoder with a single feature_layer")
        if self.merge_tokens:
            _check(self.type == "vit", "vision.merge_tokens needs vision.type vit (the tiled mllama encoder keeps "
                                       "every tile's tokens)")
            _check(len(layers) == 1, f"vision.merge_tokens needs a single feature_layer (merged layers have "
                                     f"different token counts), got {layers}")

    @property
    def layers_run(self) -> int:
        """Encoder layers that influence the features: up to the deepest selected one."""
        return max(i % (self.num_layers + 1) for i in self.feature_layers)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        fl = self.feature_layer
        return tuple(fl) if isinstance(fl, tuple) else (fl,)

    @property
    def cls_tokens(self) -> int:
        """CLS tokens kept in the features handed to the connector."""
        return 1 if (self.use_cls and self.feature_select == "full") else 0

    @property
    def feature_dim(self) -> int:
        if self.type == "mllama":
            return self.hidden_size * (1 + len(self.intermediate_layers))
        return self.hidden_size * len(self.feature_layers)


@dataclass(frozen=True)
class ImageConfig:
    """How an image becomes pixel crops.

    mode "fixed": one ``image_size`` square crop, by ``resize`` (stretch), ``pad`` (pad to square
    with the mean colour, LLaVA-1.5) or ``crop`` (shortest edge then centre crop, CLIP).
    mode "dynamic": one crop at native aspect ratio, sides multiples of the patch size, at most
    ``max_patches`` patches (NaViT / Qwen2-VL style).
    mode "tiles": a best-fit canvas of up to ``max_tiles`` ``image_size`` tiles (Llama 3.2), plus
    a low-resolution overview crop when ``overview`` is set (GPT-4V / InternVL style).
    mode "split" (Idefics3, SmolVLM): the longest side resized to ``longest_edge`` (up or down,
    the aspect ratio kept), both sides rounded up to whole ``image_size`` tiles, the tiles cut in
    row-major order, then the whole image squeezed to one tile; an image that is one tile stays
    one crop. Lanczos resampling, as the reference.
    """

    mode: str = "fixed"
    image_size: int = 224
    resize: str = "resize"
    max_patches: int = 256
    min_patches: int = 1
    max_tiles: int = 4
    overview: bool = True
    # tiles mode: pad every image to max_tiles zero tiles (Mllama). The padded tiles are encoded and
    # cached like real ones (that is what Llama 3.2 Vision computes) but no text attends to them.
    pad_tiles: bool = False
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    max_pixels: int = 64_000_000  # refuse to decode larger images (decompression bombs)
    longest_edge: int = 0  # split mode: the longest side is resized to this (0: 4 tiles' worth)
    # tiles mode's overview crop: "always", or only when the canvas has several tiles ("several",
    # Llama 4's global tile), resized bicubic or bilinear (Llama 4).
    overview_when: str = "always"
    overview_resample: str = "bicubic"
    # The dtype pixels are rescaled and normalised in: float32, or bfloat16 as Llama 4's processor
    # does (values rounded to bfloat16, handed on as float32).
    normalise_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(self.mode in ("fixed", "dynamic", "tiles", "split"),
               f"image.mode must be fixed, dynamic, tiles or split, got {self.mode!r}")
        _check(0 <= self.longest_edge <= 4096, f"image.longest_edge must be 0..4096, got {self.longest_edge}")
        _check(self.resize in ("resize", "pad", "crop"),
               f"image.resize must be resize, pad or crop, got {self.resize!r}")
        _check(self.image_size > 0, f"image.image_size must be positive, got {self.image_size}")
        _check(0 < self.min_patches <= self.max_patches,
               f"image.min_patches {self.min_patches} / max_patches {self.max_patches} invalid")
        _check(self.max_tiles >= 1, f"image.max_tiles must be >= 1, got {self.max_tiles}")
        _check(not (self.pad_tiles and self.overview), "image.pad_tiles and image.overview cannot both be set")
        _check(self.overview_when in ("always", "several"),
               f"image.overview_when must be always or several, got {self.overview_when!r}")
        _check(self.overview_resample in ("bicubic", "bilinear"),
               f"image.overview_resample must be bicubic or bilinear, got {self.overview_resample!r}")
        _check(self.normalise_dtype in ("float32", "bfloat16"),
               f"image.normalise_dtype must be float32 or bfloat16, got {self.normalise_dtype!r}")
        _set(self, "mean", tuple(float(x) for x in self.mean))
        _set(self, "std", tuple(float(x) for x in self.std))
        _check(len(self.mean) == 3 and len(self.std) == 3, "image.mean and image.std need 3 values")
        _check(self.max_pixels > 0, "image.max_pixels must be positive")


@dataclass(frozen=True)
class AudioConfig:
    """Audio input: how a clip becomes Whisper log-mel features, and the encoder that reads them.

    A clip is resampled to ``sampling_rate``, cut into ``chunk_seconds`` chunks (the last one
    zero-padded, as Whisper pads every clip to 30 s) and featurised with ``num_mel_bins`` mel bins
    every ``hop_length`` samples; clips longer than ``max_seconds`` are refused.

    encoder ``whisper``: two 1-D convolutions (the second with stride 2), learned positions, pre-norm
    transformer blocks, then average pooling by ``pool`` (Qwen2-Audio: 2, 25 tokens per second) and a
    final LayerNorm. encoder ``patch``: the mel spectrogram cut into ``patch_mels`` x
    ``patch_frames`` patches, a linear projection, learned positions and transformer blocks. Only the
    tokens of frames that hold audio reach the decoder (``num_tokens``).
    """

    sampling_rate: int = 16000
    num_mel_bins: int = 80
    n_fft: int = 400
    hop_length: int = 160
    chunk_seconds: float = 30.0
    max_seconds: float = 600.0
    encoder: str = "whisper"  # whisper | patch
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 1536
    activation: str = "gelu"
    norm_eps: float = 1e-5
    pool: int = 1  # whisper: average-pool the output by this factor (1: none)
    patch_mels: int = 16  # patch: mel bins per patch
    patch_frames: int = 8  # patch: frames per patch
    connector: str = "mlp"  # a CONNECTORS name: the projection to the decoder width

    def __post_init__(self) -> None:
        for name in ("sampling_rate", "num_mel_bins", "n_fft", "hop_length", "hidden_size", "num_layers",
                     "num_heads", "intermediate_size", "pool", "patch_mels", "patch_frames"):
            _check(getattr(self, name) > 0, f"audio.{name} must be positive, got {getattr(self, name)}")
        _check(self.chunk_seconds > 0 and self.max_seconds > 0, "audio.chunk_seconds and audio.max_seconds must be positive")
        _check(self.encoder in ("whisper", "patch"), f"audio.encoder must be whisper or patch, got {self.encoder!r}")
        _check(self.hidden_size % self.num_heads == 0,
               f"audio.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _check(self.activation in ("gelu", "quick_gelu"), f"audio.activation {self.activation!r} unknown")
        _check(self.n_fft // 2 + 1 >= self.num_mel_bins,
               f"audio.n_fft {self.n_fft} gives fewer frequency bins than num_mel_bins {self.num_mel_bins}")
        samples = self.chunk_seconds * self.sampling_rate
        _check(samples == int(samples) and int(samples) % self.hop_length == 0,
               f"audio.chunk_seconds {self.chunk_seconds:g} at {self.sampling_rate} Hz is not a whole number of "
               f"{self.hop_length}-sample hops")
        _check(self.chunk_frames >= 2 * self.pool, f"audio.chunk_seconds {self.chunk_seconds:g} is shorter than "
               "one output token")
        if self.encoder == "patch":
            _check(self.num_mel_bins % self.patch_mels == 0,
                   f"audio.num_mel_bins {self.num_mel_bins} is not a multiple of patch_mels {self.patch_mels}")
            _check(self.chunk_frames % self.patch_frames == 0,
                   f"audio chunk of {self.chunk_frames} frames is not a multiple of patch_frames {self.patch_frames}")
        from omnifuse.connectors import CONNECTORS

        _check(self.connector in CONNECTORS and CONNECTORS[self.connector].preserves_tokens,
               f"audio.connector {self.connector!r} unknown; known: "
               f"{sorted(k for k, c in CONNECTORS.items() if c.preserves_tokens)}")

    @property
    def chunk_samples(self) -> int:
        return int(self.chunk_seconds * self.sampling_rate)

    @property
    def chunk_frames(self) -> int:
        """Feature frames of one chunk."""
        return self.chunk_samples // self.hop_length


@dataclass(frozen=True)
class VideoConfig:
    """Video input: frames sampled at ``fps`` (at most ``max_frames``; processing/video.py's
    contract), each through the image processor and the vision encoder, plus a learned temporal
    embedding per frame group; ``temporal_patch`` frames in a group share one set of tokens (1:
    every frame its own, the seed's design; 2: pairs of frames merged, as Qwen2.5-VL's temporal
    patches). The image connector projects them."""

    fps: float = 1.0
    max_frames: int = 32
    temporal_patch: int = 1
    temporal_embedding: bool = True  # False: frames carry no time of their own (LLaVA-NeXT-Video)
    spatial_pool: int = 1  # average-pool each frame's patch grid by this stride (LLaVA-NeXT-Video: 2)

    def __post_init__(self) -> None:
        _check(self.spatial_pool >= 1, f"video.spatial_pool must be at least 1, got {self.spatial_pool}")
        _check(self.fps > 0, f"video.fps must be positive, got {self.fps}")
        _check(self.max_frames >= 1, f"video.max_frames must be at least 1, got {self.max_frames}")
        _check(self.temporal_patch in (1, 2), f"video.temporal_patch must be 1 or 2, got {self.temporal_patch}")


@dataclass(frozen=True)
class ConnectorConfig:
    """Turns encoder features into decoder-width tokens (``connectors/``):

    - ``linear`` / ``mlp`` (two layers, GELU): one token per feature (LLaVA);
    - ``qformer``: ``tokens`` learned queries (default 32) in ``num_layers`` BERT layers,
      cross-attending to the features every ``cross_attention_every``-th layer (BLIP-2);
    - ``perceiver``: ``tokens`` latents (default 64), ``num_layers`` perceiver layers (Flamingo);
    - ``pixel_shuffle``: each ``scale_factor`` x ``scale_factor`` block of patches one token,
      then a ``projection`` (Idefics3, SmolVLM; ``llama4``: Llama 4's two-layer adapter of
      ``hidden_size`` and its projector);
    - ``pool``: the patch grid average-pooled to ``tokens`` (a square, default 256), normalised,
      then a ``projection`` (Gemma 3).

    ``hidden_size`` / ``num_heads`` / ``intermediate_size``: the Q-Former's or perceiver's width
    (0: the encoder's feature width), heads, and feed-forward width (0: 4 x width). The perceiver
    also takes ``head_dim`` (0: width / heads), its feed-forward ``activation`` (gelu | relu) and
    ``bias`` (on its feed-forward layers), and ``projection: none``: its latents are handed on at
    its own width and the cross-attention layers project them (IDEFICS; cross fusion only).
    ``feature_norm``: the Q-Former layer-normalises the features first (off where the encoder's
    own post-norm does, BLIP-2). ``instruction_vocab_size`` > 0: the Q-Former also reads the
    prompt, tokenized by ``text.instruction_tokenizer`` into its own vocabulary of this size, at
    most ``instruction_positions`` tokens (InstructBLIP).
    ``position_embedding``: add a learned vector per token position within a crop to the output
    (zero at init). Early fusion gets positions from the decoder's RoPE; cross-attention memory has
    none of its own, so Flamingo-style models add them to the media features.
    """

    type: str = "mlp"
    bias: bool = True
    position_embedding: bool = False
    tokens: int = 0  # qformer queries, perceiver latents, pool tokens per crop; 0: the type's default
    num_layers: int = 2
    hidden_size: int = 0
    num_heads: int = 4
    intermediate_size: int = 0
    cross_attention_every: int = 2
    scale_factor: int = 2
    projection: str = "linear"
    feature_norm: bool = True
    head_dim: int = 0
    activation: str = "gelu"
    instruction_vocab_size: int = 0
    instruction_positions: int = 512

    def __post_init__(self) -> None:
        from omnifuse.connectors import CONNECTORS

        _check(self.type in CONNECTORS, f"connector.type {self.type!r} unknown; known: {sorted(CONNECTORS)}")
        for name in ("tokens", "hidden_size", "intermediate_size", "instruction_vocab_size"):
            _check(getattr(self, name) >= 0, f"connector.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.instruction_positions >= 1,
               f"connector.instruction_positions must be >= 1, got {self.instruction_positions}")
        _check(not self.instruction_vocab_size or self.type == "qformer",
               f"connector.instruction_vocab_size is a Q-Former setting (InstructBLIP), not {self.type}'s")
        for name in ("num_layers", "num_heads", "cross_attention_every", "scale_factor"):
            _check(getattr(self, name) >= 1, f"connector.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.projection in ("linear", "mlp", "none", "llama4"),
               f"connector.projection must be linear, mlp, llama4 or none, got {self.projection!r}")
        _check(self.projection != "llama4" or self.type == "pixel_shuffle",
               f"connector.projection llama4 (Llama 4's adapter and projector) follows a pixel_shuffle, not {self.type}")
        _check(self.projection != "none" or self.type == "perceiver",
               f"connector.projection none (no projection to the decoder width) is a perceiver setting, not {self.type}'s")
        _check(self.activation in ("gelu", "relu"), f"connector.activation must be gelu or relu, got {self.activation!r}")
        _check(self.head_dim >= 0, f"connector.head_dim must be >= 0, got {self.head_dim}")
        for name, default in (("head_dim", 0), ("activation", "gelu")):
            _check(getattr(self, name) == default or self.type == "perceiver",
                   f"connector.{name} is a perceiver setting, not {self.type}'s")

    @property
    def output_tokens(self) -> int:
        """Tokens per crop of the fixed-count connectors (qformer, perceiver, pool)."""
        return self.tokens or _DEFAULT_CONNECTOR_TOKENS.get(self.type, 0)


_DEFAULT_CONNECTOR_TOKENS = {"qformer": 32, "perceiver": 64, "pool": 256}


@dataclass(frozen=True)
class FusionConfig:
    """``early``: visual tokens spliced into the sequence. ``cross``: gated cross-attention layers
    inserted before the listed decoder layers (or before every ``cross_attention_every``-th);
    index ``num_layers`` means after the last one."""

    type: str = "early"
    cross_attention_layers: tuple[int, ...] = ()
    cross_attention_every: int = 0
    # Which images a text token reads: "preceding" = every image whose placeholder is at or before
    # it; "latest" = only the most recent placeholder group (Llama 3.2 Vision's processor);
    # "latest_image" = only the most recent image, even right after another (IDEFICS's processor).
    cross_attention_span: str = "preceding"
    # Tokens that see no image: "skip" = the cross-attention block adds nothing; "attend_all" = the
    # Llama 3.2 Vision reference: attention over all media is still added, only the MLP is zeroed;
    # "skip_attention" = the IDEFICS reference: the attention adds nothing, the gated MLP still runs.
    text_before_media: str = "skip"
    # RMSNorm on each head's queries and keys in the cross-attention blocks (Llama 3.2 Vision; off
    # in IDEFICS-9B).
    cross_attention_qk_norm: bool = True

    def __post_init__(self) -> None:
        from omnifuse.fusion.strategy import FUSIONS

        _check(self.type in FUSIONS, f"fusion.type must be one of {', '.join(FUSIONS)}, got {self.type!r}")
        _check(self.cross_attention_span in ("preceding", "latest", "latest_image"),
               f"fusion.cross_attention_span must be preceding, latest or latest_image, got {self.cross_attention_span!r}")
        _check(self.text_before_media in ("skip", "attend_all", "skip_attention"),
               f"fusion.text_before_media must be skip, attend_all or skip_attention, got {self.text_before_media!r}")
        _set(self, "cross_attention_layers", tuple(int(i) for i in self.cross_attention_layers))
        _check(self.cross_attention_every >= 0, "fusion.cross_attention_every must be >= 0")
        if not FUSIONS[self.type].in_sequence:
            _check(bool(self.cross_attention_layers) != bool(self.cross_attention_every),
                   "cross fusion needs exactly one of cross_attention_layers or cross_attention_every")
        _check(len(set(self.cross_attention_layers)) == len(self.cross_attention_layers),
               f"fusion.cross_attention_layers has duplicates: {self.cross_attention_layers}")

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layer indices that get a cross-attention block in front of them."""
        from omnifuse.fusion.strategy import FUSIONS

        if FUSIONS[self.type].in_sequence:
            return ()
        if self.cross_attention_every:
            n = self.cross_attention_every
            return tuple(range(n - 1, num_layers, n))  # Flamingo: every n-th layer
        return tuple(sorted(self.cross_attention_layers))


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer as data: which attention and feed-forward it has, whether it applies RoPE,
    and whether a gated cross-attention block sits in front of it. The decoder's layers are its
    ``layer_pattern`` tiled to ``num_layers``; ``cross_attention`` is then set from the fusion
    config (``ModelConfig.layer_specs``). The kinds are names in the decoder builder's registries
    (``omnifuse.decoder.builder``)."""

    # full: every earlier position; sliding: the last decoder.sliding_window positions (Mistral);
    # chunked: the positions of the query's decoder.attention_chunk_size block (Llama 4);
    # infini: the query's decoder.memory_segment block plus a compressive memory of the earlier ones.
    attention: str = "full"
    feed_forward: str = "dense"  # dense: SwiGLU; moe: mixture of experts (decoder.num_experts ...)
    rope: bool = True  # False: a NoPE layer (no rotary positions; decoder.attn_temperature_* apply)
    qk_norm: bool = False  # q and k RMS-normalised without a weight after RoPE (Llama 4)
    cross_attention: bool = False

    def __post_init__(self) -> None:
        from omnifuse.decoder.builder import ATTENTION, FEED_FORWARD

        _check(self.attention in ATTENTION,
               f"decoder layer attention {self.attention!r} unknown; known: {sorted(ATTENTION)}")
        _check(self.feed_forward in FEED_FORWARD,
               f"decoder layer feed_forward {self.feed_forward!r} unknown; known: {sorted(FEED_FORWARD)}")


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 0  # 0 means num_heads (multi-head attention)
    head_dim: int = 0  # 0 means hidden_size // num_heads
    intermediate_size: int = 11008
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 4096  # the context length
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o projections (HF LlamaConfig.attention_bias)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    extra_embeddings: int = 0  # input-only token rows past vocab_size (Mllama's <|image|> and 7 more)
    # RoPE frequency scaling: "default" (none) or "llama3" (Llama 3.1 long-context scaling).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    # Layer kinds, repeated to num_layers (a pattern of 4 with a NoPE layer last: every 4th is NoPE).
    layer_pattern: tuple[LayerSpec, ...] = (LayerSpec(),)
    # Mixture of experts (layers whose spec has feed_forward "moe"; nn/moe.py): each token goes to
    # experts_per_token of num_experts SwiGLU experts of expert_intermediate_size (0: intermediate_size),
    # beside an always-on shared expert of shared_expert_intermediate_size (0: none); router softmax
    # (Mixtral: top-k of the softmax, renormalised, scaling the outputs) or sigmoid (Llama 4: the
    # sigmoid of the top logits scaling the inputs).
    num_experts: int = 0
    experts_per_token: int = 1
    expert_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    router: str = "softmax"
    # Bounded attention (layers whose spec has attention "sliding" / "chunked"): the window, the
    # query's own position included, and the chunk, aligned to position 0. Their caches keep that many slots.
    sliding_window: int = 0
    attention_chunk_size: int = 0
    # Infini-attention layers (attention "infini", nn/infini.py): local attention within segments of
    # memory_segment positions plus a compressive memory of the earlier ones, updated by the
    # "linear" or "delta" rule.
    memory_segment: int = 0
    memory_rule: str = "delta"
    # Llama 4's attention-temperature tuning on NoPE layers (rope false): queries at position p scaled
    # by 1 + attn_temperature_scale * log(1 + floor((p + 1) / attn_temperature_floor)); 0: off.
    attn_temperature_floor: int = 0
    attn_temperature_scale: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position"):
            _check(getattr(self, name) > 0, f"decoder.{name} must be positive, got {getattr(self, name)}")
        _check(self.num_kv_heads >= 0, f"decoder.num_kv_heads must be positive (or 0 for num_heads), got {self.num_kv_heads}")
        _check(self.head_dim >= 0, f"decoder.head_dim must be positive (or 0 to derive it), got {self.head_dim}")
        if self.num_kv_heads == 0:
            _set(self, "num_kv_heads", self.num_heads)
        if self.head_dim == 0:
            _check(self.hidden_size % self.num_heads == 0,
                   f"decoder.hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
            _set(self, "head_dim", self.hidden_size // self.num_heads)
        _check(self.num_heads % self.num_kv_heads == 0,
               f"decoder.num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        _check(self.head_dim % 2 == 0, f"decoder.head_dim {self.head_dim} must be even for RoPE")
        _check(self.rope_type in ("default", "llama3"), f"decoder.rope_type {self.rope_type!r} unknown; "
               "known: default, llama3")
        if self.rope_type == "llama3":
            _check(self.rope_factor > 0 and self.rope_high_freq_factor >= self.rope_low_freq_factor,
                   "decoder llama3 rope scaling needs rope_factor > 0 and high_freq_factor >= low_freq_factor")
        _set(self, "layer_pattern", tuple(self.layer_pattern))
        _check(len(self.layer_pattern) > 0, "decoder.layer_pattern needs at least one layer spec")
        _check(all(isinstance(s, LayerSpec) for s in self.layer_pattern), "decoder.layer_pattern holds layer specs")
        _check(not any(s.cross_attention for s in self.layer_pattern),
               "decoder.layer_pattern cannot place cross-attention: use fusion.cross_attention_layers")
        if any(s.feed_forward == "moe" for s in self.layer_pattern):
            from omnifuse.nn.moe import ROUTERS

            _check(self.num_experts > 0, "decoder.layer_pattern has moe layers: decoder.num_experts must be positive")
            _check(1 <= self.experts_per_token <= self.num_experts,
                   f"decoder.experts_per_token must be in 1..{self.num_experts} (num_experts), "
                   f"got {self.experts_per_token}")
            _check(self.router in ROUTERS, f"decoder.router {self.router!r} unknown; known: {', '.join(ROUTERS)}")
            _check(self.expert_intermediate_size >= 0 and self.shared_expert_intermediate_size >= 0,
                   "decoder expert sizes must be positive (or 0)")
        kinds = {s.attention for s in self.layer_pattern}
        _check(self.memory_rule in ("linear", "delta"), f"decoder.memory_rule must be linear or delta, got {self.memory_rule!r}")
        for kind, name in (("sliding", "sliding_window"), ("chunked", "attention_chunk_size"),
                           ("infini", "memory_segment")):
            _check(getattr(self, name) >= 0, f"decoder.{name} must be positive (or 0), got {getattr(self, name)}")
            _check(kind not in kinds or getattr(self, name) > 0,
                   f"decoder.layer_pattern has {kind} attention layers: decoder.{name} must be positive")
        _check(self.attn_temperature_floor >= 0,
               f"decoder.attn_temperature_floor must be positive (or 0: off), got {self.attn_temperature_floor}")


@dataclass(frozen=True)
class TextConfig:
    """Tokenizer and special tokens. ``tokenizer`` is ``bytes`` (built in) or ``file``
    (``tokenizer.json`` + ``tokenizer_config.json`` in the checkpoint folder).

    Each modality's placeholder is a token in the text: ``placeholder_tokens`` maps the modality to
    the token's string, ``placeholder_ids`` to its id in the decoder's vocabulary. The built-in byte
    tokenizer's ids are fixed and filled in here; a ``file`` tokenizer's come from the checkpoint
    (Hugging Face ``image_token_index``) or are read from the tokenizer before the model is built
    (``processing.text.with_placeholder_ids``). The model reads them from here, nowhere else."""

    tokenizer: str = "bytes"
    placeholder_tokens: dict[str, str] = field(default_factory=lambda: {"image": "<image>"})
    placeholder_ids: dict[str, int] = field(default_factory=dict)
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    chat_template: str = ""  # jinja2; empty means the tokenizer's own, if any
    # Mllama's processor: a prompt without bos gets one after its leading image tokens.
    bos_after_leading_images: bool = False
    # Marker tokens around each image's crops ("" none; "idefics3": Idefics3 / SmolVLM's tile and
    # global-image markers; "idefics": IDEFICS's <fake_token_around_image> on both sides, one shared
    # between adjacent images; "llama4": Llama 4's image start/end, tile separators and <|image|>
    # before the global tile; processing/prompt.py).
    image_span: str = ""
    # BLIP-2 / InstructBLIP's processor: the image tokens of a prompt without placeholders go in
    # front of the tokenizer's bos ("<image>...<image><s>text").
    images_before_bos: bool = False
    # The folder (inside the checkpoint) of a second tokenizer, whose ids of the prompt the
    # connector reads with each image (InstructBLIP's Q-Former: "qformer_tokenizer"); "" none.
    instruction_tokenizer: str = ""
    # The token a prompt marks each image with, where it is not the image placeholder the features
    # are written over (Llama 4: "<|image|>" in the prompt; its span, text.image_span llama4, puts
    # the features over <|patch|> tokens); "" the placeholder itself.
    prompt_image_token: str = ""

    def __post_init__(self) -> None:
        _check(self.tokenizer in ("bytes", "file"), f"text.tokenizer must be bytes or file, got {self.tokenizer!r}")
        _check(self.image_span in ("", "idefics3", "idefics", "llama4"),
               f"text.image_span must be '', idefics3, idefics or llama4, got {self.image_span!r}")
        _check(not self.prompt_image_token or self.image_span == "llama4",
               "text.prompt_image_token needs a span rule that writes the features elsewhere (text.image_span llama4)")
        for name, kind in (("placeholder_tokens", str), ("placeholder_ids", int)):
            value = getattr(self, name)
            _check(isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, kind)
                                                   and not isinstance(v, bool) for k, v in value.items()),
                   f"text.{name} maps a modality to a token {'string' if kind is str else 'id'}, got {value!r}")
        unknown = sorted(set(self.placeholder_ids) - set(self.placeholder_tokens))
        _check(not unknown, f"text.placeholder_ids names modalities without a placeholder token: {unknown}")
        _check(all(i >= 0 for i in self.placeholder_ids.values()),
               f"text.placeholder_ids must be non-negative, got {self.placeholder_ids}")
        ids = dict(self.placeholder_ids)
        if self.tokenizer == "bytes":
            from omnifuse.processing.text import BYTE_SPECIAL_IDS

            for modality, token in self.placeholder_tokens.items():
                _check(token in BYTE_SPECIAL_IDS, f"the byte tokenizer has no {token!r} token for "
                       f"text.placeholder_tokens.{modality}; its special tokens are {sorted(BYTE_SPECIAL_IDS)}")
                fixed = BYTE_SPECIAL_IDS[token]
                _check(self.placeholder_ids.get(modality, fixed) == fixed,
                       f"text.placeholder_ids.{modality} is {self.placeholder_ids.get(modality)} but the byte "
                       f"tokenizer's {token!r} is {fixed}")
                ids[modality] = fixed
        _set(self, "placeholder_tokens", FrozenMap(self.placeholder_tokens))  # copies: the caller's
        _set(self, "placeholder_ids", FrozenMap(ids))  # dicts cannot change the config later

    @property
    def image_token(self) -> str | None:
        return self.placeholder_tokens.get("image")


@dataclass(frozen=True)
class ModelConfig:
    """A whole model. ``vision: null`` makes a text-only model (a Llama text checkpoint): no
    encoder, no connector, no media."""

    name: str = "custom"
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig | None = None
    video: VideoConfig | None = None
    # The media the model takes; empty: every modality whose section is set. A video-only model
    # (LLaVA-NeXT-Video read without its image path) still builds the vision encoder its frames use.
    inputs: tuple[str, ...] = ()
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("image", "connector", "fusion", "decoder", "text"):
            _check(dataclasses.is_dataclass(getattr(self, name)), f"{name} must be a config object")
        _check(self.vision is None or dataclasses.is_dataclass(self.vision), "vision must be a config object or null")
        _check(self.audio is None or dataclasses.is_dataclass(self.audio), "audio must be a config object or null")
        _check(self.video is None or dataclasses.is_dataclass(self.video), "video must be a config object or null")
        if self.video is not None:
            _check(self.vision is not None and self.vision.type == "vit" and self.image.mode == "fixed",
                   "video frames go through the vision encoder: video needs a vit vision encoder and image.mode fixed")
            if self.video.spatial_pool > 1:
                side = self.image.image_size // self.vision.patch_size
                _check(self.vision.cls_tokens == 0 and not self.vision.merge_tokens and side % self.video.spatial_pool == 0,
                       f"video.spatial_pool {self.video.spatial_pool} needs patch features without a class token or "
                       f"token merging, on a grid it divides ({side} x {side})")
        _set(self, "inputs", tuple(self.inputs))
        from omnifuse.modalities import MODALITIES

        for m in self.inputs:
            _check(m in MODALITIES and getattr(self, MODALITIES[m].section) is not None,
                   f"inputs names {m!r}, which needs its config section ({MODALITIES[m].section if m in MODALITIES else 'unknown'})")
        rows = self.decoder.vocab_size + self.decoder.extra_embeddings
        for modality in self.modalities:
            _check(modality in self.text.placeholder_tokens,
                   f"a model that takes {modality} needs text.placeholder_tokens.{modality} (e.g. '<{modality}>')")
            i = self.text.placeholder_ids.get(modality, 0)
            _check(i < rows, f"text.placeholder_ids.{modality} {i} is outside the decoder's {rows} embeddings")
        _check(bool(self.connector.instruction_vocab_size) == bool(self.text.instruction_tokenizer),
               "connector.instruction_vocab_size (a Q-Former that reads the prompt) and text.instruction_tokenizer "
               "(the tokenizer it reads it in) go together")
        if not self.modalities:
            _check(not self.fusion.resolved_layers(self.decoder.num_layers),
                   "a text-only model (no vision, no audio) has no fusion layers; use fusion.type early")
        if self.connector.projection == "none":
            from omnifuse.fusion.strategy import FUSIONS

            _check(not FUSIONS[self.fusion.type].in_sequence and self.modalities == ("image",),
                   "connector.projection none hands on tokens narrower or wider than the decoder: it needs cross "
                   "fusion (whose layers project them) and images as the only media")
        if self.vision is None:
            return
        if self.image.mode in ("fixed", "tiles", "split"):
            _check(self.image.image_size % self.vision.patch_size == 0,
                   f"image.image_size {self.image.image_size} is not a multiple of vision.patch_size "
                   f"{self.vision.patch_size}")
        from omnifuse.connectors import CONNECTORS

        c = self.connector
        if not CONNECTORS[c.type].preserves_tokens:
            _check(self.vision.type == "vit", f"connector.type {c.type} needs a vit encoder (the tiled mllama "
                                              "encoder's features go through a linear connector)")
            if c.type in ("qformer", "perceiver") and not c.head_dim:
                width = c.hidden_size or self.vision.feature_dim
                _check(width % c.num_heads == 0, f"connector width {width} is not divisible by "
                                                 f"connector.num_heads {c.num_heads}")
            else:
                _check(self.image.mode != "dynamic", f"connector.type {c.type} needs a fixed patch grid "
                                                     "(image.mode fixed, tiles or split)")
        if self.image.mode in ("fixed", "tiles", "split"):
            self.tokens_per_crop  # noqa: B018 -- the connector refuses a grid it cannot take (ConfigError)
        if self.connector.position_embedding:
            _check(self.vision.type == "vit" and self.image.mode in ("fixed", "tiles", "split"),
                   "connector.position_embedding needs a vit encoder and fixed or tiles image mode "
                   "(a fixed number of tokens per crop)")
        for i in self.fusion.resolved_layers(self.decoder.num_layers):
            # Index num_layers places a cross-attention layer after the last decoder layer.
            _check(0 <= i <= self.decoder.num_layers,
                   f"fusion.cross_attention_layers index {i} is outside 0..{self.decoder.num_layers}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media this model takes: the registered modalities (``omnifuse.modalities``) whose
        config section is set, limited to ``inputs`` when it is given. Each has a processor and a
        placeholder; its encoder and connector are among ``media_parts``."""
        from omnifuse.modalities import MODALITIES

        return tuple(m for m, spec in MODALITIES.items()
                     if getattr(self, spec.section) is not None and (not self.inputs or m in self.inputs))

    @property
    def media_parts(self) -> tuple[str, ...]:
        """The modalities whose encoder and connector the model builds: those it takes, and those
        they use (video uses the image encoder and connector)."""
        from omnifuse.modalities import MODALITIES

        needed = set(self.modalities)
        for m in self.modalities:
            needed |= set(MODALITIES[m].needs)
        return tuple(m for m in MODALITIES if m in needed)

    @property
    def has_media(self) -> bool:
        return bool(self.modalities)

    @property
    def cross_layers(self) -> tuple[int, ...]:
        return self.fusion.resolved_layers(self.decoder.num_layers)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Every decoder layer's spec: the pattern tiled to ``num_layers``, cross-attention in front
        of the layers the fusion config names. (A cross-attention block after the last layer,
        index ``num_layers``, belongs to no layer: ``final_cross_attention``.)"""
        pattern, cross = self.decoder.layer_pattern, set(self.cross_layers)
        return tuple(dataclasses.replace(pattern[i % len(pattern)], cross_attention=i in cross)
                     for i in range(self.decoder.num_layers))

    @property
    def media_width(self) -> int:
        """The width of the media tokens the connectors hand on: the decoder's, or the perceiver's own
        when ``connector.projection`` is none (IDEFICS: the cross-attention layers project it)."""
        c = self.connector
        if c.projection == "none" and self.vision is not None:
            return c.hidden_size or self.vision.feature_dim
        return self.decoder.hidden_size

    @property
    def final_cross_attention(self) -> bool:
        return self.decoder.num_layers in self.cross_layers

    @property
    def tokens_per_crop(self) -> int:
        """Visual tokens one crop gives (fixed and tiles modes): the connector's output for it."""
        from omnifuse.connectors import crop_tokens

        side = self.image.image_size // self.vision.patch_size
        return crop_tokens(self, (side, side))


# ---------------------------------------------------------------------------------------------
# Serialisation: nested dicts with the same field names; unknown keys are errors.


def config_to_dict(cfg: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, UnionType) and type(None) in args and any(dataclasses.is_dataclass(a) for a in args):
        inner = next(a for a in args if dataclasses.is_dataclass(a))
        return None if value is None else config_from_dict(inner, value, where)
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(v if isinstance(v, args[0]) else config_from_dict(args[0], v, f"{where}[{i}]")
                     for i, v in enumerate(value))
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    if origin is tuple or origin is Union:
        if origin is tuple and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value) if isinstance(value, list) else value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    if cls is TextConfig and "image_token" in data:  # configs saved before placeholders were per modality
        data = dict(data)
        token = _coerce(str, data.pop("image_token"), f"{where}.image_token".lstrip("."))
        if "placeholder_tokens" in data:
            raise ConfigError(f"{where or 'text'}: give either image_token (the old key) or placeholder_tokens")
        data["placeholder_tokens"] = {"image": token}
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config keys in {where or cls.__name__}: {unknown}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # wrong value types surface here
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """A YAML file parsed; a syntax error is one ConfigError naming the file, line and column."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(_read_text(path, what))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        data = read_yaml(path, "model config")
    else:
        try:
            data = json.loads(_read_text(path, "model config"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    try:
        return config_from_dict(ModelConfig, data)
    except ConfigError as e:
        raise ConfigError(f"model config {path}: {e}") from None
