"""Rotary position embedding (Su et al. 2021), in the "rotate half" layout Llama checkpoints use."""

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds inverse frequencies; returns cos/sin for arbitrary (per-row) position ids.

    ``scaling`` (Llama 3.1 "llama3" rope scaling): ``{"factor", "low_freq_factor",
    "high_freq_factor", "original_max_position"}``; long wavelengths are divided by ``factor``,
    short ones kept, the band between interpolated smoothly.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        if self.scaling is None:
            return inv_freq
        factor, low, high = self.scaling["factor"], self.scaling["low_freq_factor"], self.scaling["high_freq_factor"]
        old_len = self.scaling["original_max_position"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` (needed after building on the meta device)."""
        device = "cpu" if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = self._inv_freq().to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, 1, T, head_dim)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, Dh); cos/sin: (B, 1, T, Dh)
    return x * cos + _rotate_half(x) * sin
