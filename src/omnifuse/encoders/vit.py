"""Vision Transformer image encoder (Dosovitskiy et al. 2021) in the CLIP layout LLaVA uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.encoders.tome import Merge, merge_count
from omnifuse.nn.attention import Attention
from omnifuse.nn.mlp import ViTMLP


class ViTLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, dim: int, num_heads: int, hidden: int, activation: str, eps: float, qkv_bias: bool,
                 key_bias: bool | None = None) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, num_heads, bias=qkv_bias, key_bias=key_bias)  # bidirectional
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ViTMLP(dim, hidden, activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, rope=rope)
        return x + self.mlp(self.layer_norm2(x))

    def forward_merging(self, x: torch.Tensor, size: torch.Tensor, r: int,
                        protected: int) -> tuple[torch.Tensor, torch.Tensor, Merge | None]:
        """The layer with token merging (encoders/tome.py): attention weighted by each token's
        size, then up to ``r`` tokens merged before the MLP. x: (B, N, D), size: (B, N, 1)
        -> (B, N - r', D), (B, N - r', 1), and the layer's merge (None when it merged nothing)."""
        attn, h = self.self_attn, self.layer_norm1(x)
        b, n, _ = h.shape
        q = attn._queries(h)
        k, v = attn.memory_kv(h)  # (B, H, N, Dh)
        bias = size.log().to(q.dtype).view(b, 1, 1, n)  # proportional attention
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        r = merge_count(n, r, protected)
        merge = Merge(k.mean(dim=1), r, protected) if r else None
        if merge is not None:
            x, size = merge.weighted(x, size)
        return x + self.mlp(self.layer_norm2(x)), size, merge


def conv_stem_layers(num_channels: int, dim: int, patch_size: int) -> list[tuple[int, int, int, int]]:
    """The convolutions of ``conv_stem`` as (in, out, kernel, stride)."""
    steps = patch_size.bit_length() - 1  # patch_size = 2 ** steps
    layers, ch_in = [], num_channels
    for i in range(steps - 1):
        ch_out = max(dim >> (steps - 1 - i), 8)
        layers.append((ch_in, ch_out, 3, 2))
        ch_in = ch_out
    return layers + [(ch_in, dim, 2, 2)]


def conv_stem(num_channels: int, dim: int, patch_size: int) -> nn.Sequential:
    """Xiao et al. 2021, "Early convolutions help transformers see better": stride-2 3x3
    convolutions (channels doubling up to dim / 2), then a 2x2 stride-2 projection, in place of
    the single patch_size x patch_size projection. Same output grid; trains much faster from
    scratch because neighbouring pixels are combined before attention has to learn to."""
    *hidden, (ch_in, ch_out, k, s) = conv_stem_layers(num_channels, dim, patch_size)
    layers: list[nn.Module] = []
    for ci, co, kernel, stride in hidden:
        layers += [nn.Conv2d(ci, co, kernel, stride=stride, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(ch_in, ch_out, k, stride=s))
    for conv in layers[::2]:
        conv.keeps_default_init = True  # PyTorch's fan-in init: std 0.02 would vanish over the stack
    return nn.Sequential(*layers)


def axial_rope(rows: int, cols: int, head_dim: int, theta: float, cls: int = 0,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary positions of a (rows, cols) patch grid, then ``cls`` class tokens at angle 0
    (Llama 4's vision encoder): the first half of each head's rotation pairs turn with the patch's
    column + 1, the second half with its row + 1, at frequencies ``theta ** (-4j / head_dim)``.
    Returns cos, sin (1, 1, rows * cols + cls, head_dim) in the half-split layout of ``apply_rope``."""
    quarter = head_dim // 4
    freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, device=device)[:quarter].float() / (head_dim // 2))
    idx = torch.arange(rows * cols, device=device)
    x, y = (idx % cols + 1).float(), (idx // cols + 1).float()
    angles = torch.cat([x[:, None] * freq, y[:, None] * freq], dim=-1)  # (N, head_dim / 2)
    angles = torch.cat([angles, angles.new_zeros(cls, angles.shape[1])])
    emb = torch.cat([angles, angles], dim=-1)[None, None]
    return emb.cos(), emb.sin()


class VisionTransformer(nn.Module):
    """Patch embedding, optional CLS token, learned positions, pre-norm layers.

    Positions are learned for ``image_size // patch_size`` squared patches and bicubically
    interpolated for other grids, so crops of any patch-multiple size (dynamic resolution) work.
    ``forward`` returns the selected hidden state(s): ``feature_layers`` index the list of
    ``num_layers + 1`` hidden states (0 = embeddings), several are concatenated on channels, and
    ``drop_cls`` removes the CLS token (LLaVA's "default" feature select strategy).

    ``cls_last``: the CLS token follows the patches, its position embedding the last row (Llama
    4). ``rope_theta`` > 0: every layer's attention also rotates q and k by the patches' 2-D
    positions (``axial_rope``; Llama 4), the class token unrotated.
    """

    def __init__(self, *, image_size: int, patch_size: int, dim: int, num_layers: int, num_heads: int,
                 hidden: int, num_channels: int = 3, use_cls: bool = True, activation: str = "gelu",
                 eps: float = 1e-5, pre_norm: bool = True, patch_bias: bool = False, qkv_bias: bool = True,
                 feature_layers: tuple[int, ...] = (-1,), drop_cls: bool = True, stem: str = "patch",
                 merge_tokens: int = 0, post_norm: bool = False, cls_last: bool = False,
                 rope_theta: float = 0.0) -> None:
        """``merge_tokens``: ToMe's r, the tokens each layer merges (0: none); needs one feature layer.
        ``post_norm``: a LayerNorm on the output features (SigLIP's post_layernorm)."""
        super().__init__()
        if merge_tokens and len(feature_layers) != 1:
            raise ValueError("token merging needs a single feature layer")
        self.merge_tokens = merge_tokens
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.use_cls, self.drop_cls = use_cls, drop_cls and use_cls
        self.cls_last, self.rope_theta, self.head_dim = cls_last and use_cls, rope_theta, dim // num_heads
        if rope_theta and merge_tokens:
            raise ValueError("token merging with 2-D rotary positions is not supported")
        n_layers_total = num_layers + 1
        self.feature_layers = tuple(i % n_layers_total for i in feature_layers)
        # Layers past the deepest selected feature never influence the output: skip building them.
        self.num_layers_used = max(self.feature_layers)
        if stem == "conv":
            self.patch_embedding = conv_stem(num_channels, dim, patch_size)
        else:
            self.patch_embedding = nn.Conv2d(num_channels, dim, patch_size, stride=patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(dim)) if use_cls else None
        self.position_embedding = nn.Parameter(torch.zeros(self.grid * self.grid + int(use_cls), dim))
        self.pre_layernorm = nn.LayerNorm(dim, eps=eps) if pre_norm else None
        self.layers = nn.ModuleList(
            ViTLayer(dim, num_heads, hidden, activation, eps, qkv_bias) for _ in range(self.num_layers_used)
        )
        self.post_layernorm = nn.LayerNorm(dim, eps=eps) if post_norm else None

    def init_parameters(self, std: float) -> None:
        """The parameters the model's generic init (``MultimodalModel.reset_parameters``) leaves out."""
        nn.init.normal_(self.position_embedding, std=std)
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=std)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a (rows, cols) patch grid: (rows*cols + cls, D)."""
        pos = self.position_embedding
        if self.cls_last:
            cls_pos, patch_pos = pos[-1:], pos[:-1]
        else:
            cls_pos, patch_pos = (pos[:1], pos[1:]) if self.use_cls else (pos[:0], pos)
        if (rows, cols) != (self.grid, self.grid):
            d = patch_pos.shape[-1]
            grid = patch_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)  # (1, D, g, g)
            grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
            patch_pos = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(rows * cols, d)
        return torch.cat([patch_pos, cls_pos] if self.cls_last else [cls_pos, patch_pos], dim=0)

    def forward(self, pixel_values: torch.Tensor, sources: bool = False):
        """pixel_values: (N, C, H, W) with H, W multiples of patch_size -> (N, rows*cols [+1 if CLS
        kept], D * len(feature_layers)). ``sources`` (with token merging): also return which input
        tokens each output token holds, (N, tokens out, tokens in) of 0/1 (ToMe's source tracking;
        class token included on both sides)."""
        x = self.patch_embedding(pixel_values.to(self.position_embedding.dtype))  # (N, D, rows, cols)
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (N, rows*cols, D)
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([x, cls] if self.cls_last else [cls, x], dim=1)
        x = x + self.positions(rows, cols)
        rope = None
        if self.rope_theta:
            rope = tuple(t.to(x.dtype) for t in axial_rope(rows, cols, self.head_dim, self.rope_theta,
                                                           int(self.use_cls), x.device))
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        states = {0: x} if 0 in self.feature_layers else {}
        size = x.new_ones(x.shape[0], x.shape[1], 1) if self.merge_tokens else None
        source = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1) if sources else None
        for i, layer in enumerate(self.layers, start=1):
            if size is None:
                x = layer(x, rope=rope)
            else:
                x, size, merge = layer.forward_merging(x, size, self.merge_tokens, protected=int(self.use_cls))
                if source is not None and merge is not None:
                    source = merge(source)
            if i in self.feature_layers:
                states[i] = x
        out = torch.cat([states[i] for i in self.feature_layers], dim=-1)
        if self.post_layernorm is not None:
            out = self.post_layernorm(out)
        if self.drop_cls:
            out = out[:, :-1] if self.cls_last else out[:, 1:]
        return (out, source) if sources else out
