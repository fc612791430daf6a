"""Rotary position embedding (Su et al. 2021), in the "rotate half" layout Llama checkpoints use."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds inverse frequencies; returns cos/sin for arbitrary (per-row) position ids."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` (needed after building on the meta device)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

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
