"""Llama 3.2 Vision (Mllama) image encoder: a tiled ViT followed by a gated global transformer.

Follows Hugging Face ``MllamaVisionModel`` (transformers ``models/mllama/modeling_mllama.py``) output
for output, and uses its parameter names, so a checkpoint's ``vision_model.*`` (or
``model.vision_model.*``) tensors load after stripping that prefix. An image arrives as up to
``max_num_tiles`` square tiles plus an aspect-ratio id (1-based index into the processor's tile
grids, 0 = padding image). Each tile is patch-embedded on its own; tiles of one image then attend to
each other in one long sequence, in a local transformer and then a global one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.errors import CheckpointError
from omnifuse.nn.attention import Attention
from omnifuse.nn.mlp import ACTIVATIONS, ViTMLP

# MllamaVisionConfig defaults (the 11B / 90B checkpoints).
DEFAULT_INTERMEDIATE_LAYERS = (3, 7, 15, 23, 30)
SEQUENCE_MULTIPLE = 8  # HF pads each tile's token sequence to a multiple of 8


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (width, height) with width * height <= max_num_tiles; aspect-ratio id = index + 1.

    Mllama image processor ``get_all_supported_aspect_ratios``: 8 grids for 4 tiles.
    """
    return [(w, h) for w in range(1, max_num_tiles + 1) for h in range(1, max_num_tiles + 1)
            if w * h <= max_num_tiles]


def pack_tiles(tiles: torch.Tensor, max_num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad one image's real tiles to ``max_num_tiles``, as the Mllama processor does.

    tiles: (n_tiles, C, S, S) -> pixel_values (max_num_tiles, C, S, S), aspect_ratio_mask (max_num_tiles,)
    """
    n = tiles.shape[0]
    if not 1 <= n <= max_num_tiles:
        raise ValueError(f"an image needs 1 to {max_num_tiles} tiles, got {n}")
    pixel_values = tiles.new_zeros(max_num_tiles, *tiles.shape[1:])
    pixel_values[:n] = tiles
    mask = torch.zeros(max_num_tiles, dtype=torch.long, device=tiles.device)
    mask[:n] = 1
    return pixel_values, mask


def aspect_ratio_attention_mask(aspect_ratio_mask: torch.Tensor, tokens_per_tile: int, num_padding: int,
                                dtype: torch.dtype) -> torch.Tensor:
    """Additive mask over the T * (L + pad) tokens of each image (HF ``_prepare_aspect_ratio_attention_mask``).

    A token is padding if its tile is padding or it is one of the pad-to-a-multiple-of-8 tokens.
    HF masks the outer product of that indicator with itself, so only (padding query, padding key)
    pairs are blocked: real tokens still attend to padding tiles and pad tokens, and a padding-tile
    token attends only to real ones. Released checkpoints ran with this mask, so it is kept as is.
    aspect_ratio_mask: (N, T) 1 for real tiles -> (N, 1, T*(L+pad), T*(L+pad))
    """
    n, _ = aspect_ratio_mask.shape
    real = aspect_ratio_mask.to(torch.bool)[:, :, None].repeat(1, 1, tokens_per_tile + num_padding)  # (N, T, L+pad)
    real[:, :, tokens_per_tile:] = False
    padding = (~real).reshape(n, -1).to(dtype)  # (N, S)
    # Finite minimum, not -inf: an all-padding row (padding image) then softmaxes to uniform, not NaN, as in HF.
    both = padding[:, :, None] * padding[:, None, :]  # (N, S, S)
    return (both * torch.finfo(dtype).min)[:, None]


class AspectRatioEmbedding(nn.Module):
    """One learned vector per (aspect ratio, tile), added to all of that tile's tokens through a tanh gate.

    HF ``MllamaPrecomputedAspectRatioEmbedding`` (used before and after the local transformer).
    """

    def __init__(self, num_aspect_ratios: int, max_num_tiles: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_aspect_ratios + 1, max_num_tiles * dim)  # row 0: padding image
        self.gate = nn.Parameter(torch.zeros(1))  # zero init: starts as identity

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: (N, T, L, D); aspect_ratio_ids: (N,) -> (N, T, L, D)
        n, t, _, d = x.shape
        return x + self.embedding(aspect_ratio_ids).view(n, t, 1, d) * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """x + (1 - tanh g) * position + tanh g * tile_position[aspect ratio] (HF ``MllamaPrecomputedPositionEmbedding``).

    ``position`` is shared by all tiles; ``tile_position`` is learned per aspect ratio, tile and token.
    """

    def __init__(self, num_aspect_ratios: int, max_num_tiles: int, tokens_per_tile: int, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(dim ** -0.5 * torch.randn(tokens_per_tile, dim))
        self.tile_embedding = nn.Embedding(num_aspect_ratios + 1, max_num_tiles * tokens_per_tile * dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: (N, T, L, D); aspect_ratio_ids: (N,) -> (N, T, L, D)
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        return x + gate * self.tile_embedding(aspect_ratio_ids).view(x.shape)


class MllamaVisionLayer(nn.Module):
    """Pre-norm block; in the global transformer each residual branch is scaled by tanh(gate) (Mllama)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, activation: str, eps: float, gated: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)  # bidirectional, no biases (Mllama)
        self.mlp = ViTMLP(dim, hidden, activation)
        self.input_layernorm = nn.LayerNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=eps)
        # Zero init makes a fresh global layer the identity (Flamingo-style tanh gate).
        self.gate_attn = nn.Parameter(torch.zeros(1)) if gated else None
        self.gate_ffn = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S, D)
        h = self.self_attn(self.input_layernorm(x), mask=mask)
        x = x + (h if self.gate_attn is None else self.gate_attn.tanh() * h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if self.gate_ffn is None else self.gate_ffn.tanh() * h)


class MllamaVisionStack(nn.Module):
    """A stack of layers that can hand back chosen layer outputs (HF ``MllamaVisionEncoder``)."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, hidden: int, activation: str, eps: float,
                 gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MllamaVisionLayer(dim, num_heads, hidden, activation, eps, gated) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                collect: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # x: (B, S, D) -> last output (B, S, D), outputs of layers ``collect`` (0-based) in that order
        states = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i in collect:
                states[i] = x
        return x, [states[i] for i in collect]


class MllamaVisionEncoder(nn.Module):
    """Llama 3.2 Vision image encoder with HF ``MllamaVisionModel`` parameter names and outputs.

    Output features per token: the global transformer's last state, then the local transformer's
    states after layers ``intermediate_layers`` (0-based; before ``layernorm_post``) interleaved as
    HF does, so ``output_dim = dim * (1 + len(intermediate_layers))`` (HF ``vision_output_dim``).
    """

    def __init__(self, *, image_size: int, patch_size: int, dim: int, num_layers: int, num_global_layers: int,
                 num_heads: int, hidden: int, intermediate_layers: tuple[int, ...], max_num_tiles: int,
                 num_channels: int = 3, eps: float = 1e-5, activation: str = "gelu",
                 num_aspect_ratios: int | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; choose from {sorted(ACTIVATIONS)}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        bad = [i for i in intermediate_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"intermediate_layers {bad} out of range for {num_layers} layers")
        if num_aspect_ratios is None:
            num_aspect_ratios = len(supported_aspect_ratios(max_num_tiles))
        self.image_size, self.patch_size, self.max_num_tiles, self.dim = image_size, patch_size, max_num_tiles, dim
        # HF indexes a tuple of layer outputs, so negative indices count from the last layer.
        self.intermediate_layers = tuple(i % num_layers for i in intermediate_layers)
        tokens = self.tokens_per_tile

        self.patch_embedding = nn.Conv2d(num_channels, dim, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(dim ** -0.5 * torch.randn(dim))
        self.pre_tile_positional_embedding = AspectRatioEmbedding(num_aspect_ratios, max_num_tiles, dim)
        self.gated_positional_embedding = GatedPositionEmbedding(num_aspect_ratios, max_num_tiles, tokens, dim)
        self.post_tile_positional_embedding = AspectRatioEmbedding(num_aspect_ratios, max_num_tiles, dim)
        # HF builds these two with nn.LayerNorm's default eps (1e-5), not the config's norm_eps.
        self.layernorm_pre = nn.LayerNorm(dim)
        self.layernorm_post = nn.LayerNorm(dim)
        self.transformer = MllamaVisionStack(num_layers, dim, num_heads, hidden, activation, eps, gated=False)
        self.global_transformer = MllamaVisionStack(num_global_layers, dim, num_heads, hidden, activation, eps,
                                                    gated=True)

    @property
    def output_dim(self) -> int:
        return self.dim * (1 + len(self.intermediate_layers))

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + class token

    def init_parameters(self, std: float) -> None:
        """The parameters the model's generic init (``MultimodalModel.reset_parameters``) leaves out."""
        nn.init.normal_(self.class_embedding, std=std)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        # pixel_values: (N, T, C, S, S), one row per image, padding tiles zero; aspect_ratio_ids: (N,)
        # 1-based (0 = padding image); aspect_ratio_mask: (N, T) 1 for real tiles
        # -> (N, T, L, output_dim) with L = tokens_per_tile
        n, t, c, h, w = pixel_values.shape
        if (t, h, w) != (self.max_num_tiles, self.image_size, self.image_size):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} must be (N, {self.max_num_tiles}, C, "
                             f"{self.image_size}, {self.image_size})")
        if aspect_ratio_ids.shape != (n,) or aspect_ratio_mask.shape != (n, t):
            raise ValueError(f"aspect_ratio_ids {tuple(aspect_ratio_ids.shape)} and aspect_ratio_mask "
                             f"{tuple(aspect_ratio_mask.shape)} must be ({n},) and ({n}, {t})")
        d, length = self.dim, self.tokens_per_tile
        x = self.patch_embedding(pixel_values.reshape(n * t, c, h, w).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(n, t, length - 1, d)  # (N, T, P, D)
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        x = torch.cat([self.class_embedding.expand(n, t, 1, d), x], dim=2)  # (N, T, L, D)
        x = self.gated_positional_embedding(x, aspect_ratio_ids)
        x = self.layernorm_pre(x)

        # L = g^2 + 1 is never a multiple of 8 (squares are 0, 1 or 4 mod 8), so pad is 3, 6 or 7.
        # (HF's ``[-pad:]`` slice would mark every token as padding were pad ever 0.)
        pad = -length % SEQUENCE_MULTIPLE
        padded = length + pad
        x = F.pad(x, (0, 0, 0, pad))  # (N, T, L+pad, D)
        mask = aspect_ratio_attention_mask(aspect_ratio_mask, length, pad, x.dtype)  # (N, 1, S, S)

        x, intermediate = self.transformer(x.view(n, t * padded, d), mask, self.intermediate_layers)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.view(n, t, padded, d), aspect_ratio_ids)
        x, _ = self.global_transformer(x.view(n, t * padded, d), mask)  # (N, S, D)

        features = [x]
        if intermediate:
            # HF stacks on a new last axis before flattening, so channel c * K + k is layer k's channel c.
            features.append(torch.stack(intermediate, dim=-1).flatten(-2))  # (N, S, D*K)
        out = torch.cat(features, dim=-1).view(n, t, padded, self.output_dim)
        return out[:, :, :length]  # HF drops the pad tokens only here, after both transformers


def mllama_vision_kwargs(hf_vision_config: dict) -> dict:
    """``MllamaVisionEncoder`` keyword arguments from a HF ``MllamaVisionConfig`` dict (config.json["vision_config"]).

    Missing keys take ``MllamaVisionConfig``'s defaults. ``vision_output_dim`` describes the projector's
    input and is not read; compare it with ``output_dim``.
    """
    cfg = hf_vision_config
    for key in ("image_size", "patch_size"):
        if not isinstance(cfg.get(key, 0), int):
            raise CheckpointError(f"{key}={cfg[key]!r} is not supported: MllamaVisionModel needs an int")
    activation = cfg.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"hidden_act={activation!r} is not supported; choose from {sorted(ACTIVATIONS)}")
    max_num_tiles = cfg.get("max_num_tiles", 4)
    ratios = cfg.get("supported_aspect_ratios")
    if ratios is None:
        ratios = supported_aspect_ratios(4)  # HF's default list, valid only with 4 tiles
        if max_num_tiles != 4:
            raise CheckpointError(f"max_num_tiles={max_num_tiles} needs explicit supported_aspect_ratios "
                                  "(HF's default list is for 4 tiles)")
    layers = cfg.get("intermediate_layers_indices")
    return dict(
        image_size=cfg.get("image_size", 448),
        patch_size=cfg.get("patch_size", 14),
        dim=cfg.get("hidden_size", 1280),
        num_layers=cfg.get("num_hidden_layers", 32),
        num_global_layers=cfg.get("num_global_layers", 8),
        num_heads=cfg.get("attention_heads", cfg.get("num_attention_heads", 16)),
        hidden=cfg.get("intermediate_size", 5120),
        intermediate_layers=DEFAULT_INTERMEDIATE_LAYERS if layers is None else tuple(layers),
        max_num_tiles=max_num_tiles,
        num_channels=cfg.get("num_channels", 3),
        eps=cfg.get("norm_eps", 1e-5),
        activation=activation,
        num_aspect_ratios=len(ratios),
    )
