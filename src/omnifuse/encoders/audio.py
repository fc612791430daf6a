"""Audio encoders over Whisper log-mel chunks (processing/audio.py).

Both take ``input_features`` (N chunks, mel bins, frames) and ``audio_frames`` (N,): how many
frames of each chunk hold audio. Keys past those frames are masked, so the tokens of the audio do
not depend on how much padding its chunk has; ``audio_tokens(config, frames)`` is how many leading
tokens of a chunk's output belong to audio (the processor keeps only those).

- ``WhisperEncoder``: Whisper / Qwen2-Audio: conv(k3) + GELU, conv(k3, stride 2) + GELU, learned
  positions, pre-norm blocks, optional average pooling, final LayerNorm.
- ``PatchAudioEncoder``: the spectrogram as an image of ``patch_mels`` x ``patch_frames`` patches
  (AST-style), a linear projection, learned positions, pre-norm blocks, final LayerNorm. Tokens run
  time-major: all mel bands of the first frames, then the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.encoders.vit import ViTLayer

__all__ = ["PatchAudioEncoder", "WhisperEncoder", "audio_tokens"]


def _conv_frames(frames):
    return (frames - 1) // 2 + 1  # Whisper's stride-2 convolution


def audio_tokens(config, frames: int) -> int:
    """Tokens the ``config.encoder`` encoder makes of a chunk with ``frames`` audio frames (an
    ``AudioConfig``; a pure function the processor and the cost figures use)."""
    if config.encoder == "patch":
        return -(-frames // config.patch_frames) * (config.num_mel_bins // config.patch_mels)
    n = _conv_frames(frames)  # Qwen2-Audio's output lengths
    return n if config.pool == 1 else (n - config.pool) // config.pool + 1


def _key_mask(valid: torch.Tensor, length: int) -> torch.Tensor:
    """(N,) valid lengths -> (N, 1, 1, length) bool: keys that may be attended."""
    return (torch.arange(length, device=valid.device)[None, :] < valid[:, None])[:, None, None, :]


class WhisperEncoder(nn.Module):
    def __init__(self, *, num_mel_bins: int, chunk_frames: int, dim: int, num_layers: int, num_heads: int,
                 hidden: int, activation: str = "gelu", eps: float = 1e-5, pool: int = 1) -> None:
        super().__init__()
        self.pool = pool
        self.positions = (chunk_frames - 1) // 2 + 1
        self.conv1 = nn.Conv1d(num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Parameter(torch.zeros(self.positions, dim))
        self.layers = nn.ModuleList(ViTLayer(dim, num_heads, hidden, activation, eps, qkv_bias=True, key_bias=False)
                                    for _ in range(num_layers))  # Whisper's keys have no bias
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.embed_positions, std=std)

    def forward(self, input_features: torch.Tensor, audio_frames: torch.Tensor) -> torch.Tensor:
        # (N, mels, F), (N,) -> (N, positions // pool, D)
        x = F.gelu(self.conv1(input_features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, positions, D)
        x = x + self.embed_positions[: x.shape[1]]
        mask = _key_mask(_conv_frames(audio_frames.to(x.device)), x.shape[1])
        for layer in self.layers:
            x = layer(x, mask=mask)
        if self.pool > 1:
            x = F.avg_pool1d(x.transpose(1, 2), self.pool, self.pool).transpose(1, 2)
        return self.layer_norm(x)


class PatchAudioEncoder(nn.Module):
    def __init__(self, *, num_mel_bins: int, chunk_frames: int, dim: int, num_layers: int, num_heads: int,
                 hidden: int, patch_mels: int, patch_frames: int, activation: str = "gelu",
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.patch_mels, self.patch_frames = patch_mels, patch_frames
        self.bands = num_mel_bins // patch_mels
        self.steps = chunk_frames // patch_frames
        self.proj = nn.Linear(patch_mels * patch_frames, dim)
        self.embed_positions = nn.Parameter(torch.zeros(self.steps * self.bands, dim))
        self.layers = nn.ModuleList(ViTLayer(dim, num_heads, hidden, activation, eps, qkv_bias=True)
                                    for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.embed_positions, std=std)

    def forward(self, input_features: torch.Tensor, audio_frames: torch.Tensor) -> torch.Tensor:
        # (N, mels, F), (N,) -> (N, steps * bands, D)
        n = input_features.shape[0]
        x = input_features.to(self.proj.weight.dtype)
        x = x.reshape(n, self.bands, self.patch_mels, self.steps, self.patch_frames)
        x = x.permute(0, 3, 1, 2, 4).reshape(n, self.steps * self.bands, self.patch_mels * self.patch_frames)
        x = self.proj(x) + self.embed_positions
        steps = -(-audio_frames.to(x.device) // self.patch_frames)
        mask = _key_mask(steps * self.bands, x.shape[1])
        for layer in self.layers:
            x = layer(x, mask=mask)
        return self.layer_norm(x)
