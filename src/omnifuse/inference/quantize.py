"""int8 weights for CPU inference (W8A8, per-channel weights, per-token activations).

Each linear keeps its weight as int8 with one float scale per output channel (symmetric, absmax /
127). At run time each token's activations are quantized to int8 with their own scale (per-token
absmax, LLM.int8 / SmoothQuant convention without outlier handling), multiplied with
``torch._int_mm`` into int32, and rescaled. Per-token scales keep one large-valued token (an image
token, bos) from coarsening every other token's precision, as a per-tensor scale would. At decode,
where a step reads every weight once, int8 weights cut memory traffic 4x against float32.
The vision encoder stays in float32 (it runs once per image).
"""

from __future__ import annotations

import torch
from torch import nn

from omnifuse.errors import ConfigError

__all__ = ["Int8Linear", "quantize_int8"]


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W in int8 (per output channel) and x quantized per token."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", linear.bias.detach().float() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()  # (N, in)
        x_scale = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (N, 1)
        x_int8 = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(x_int8, self.weight_int8.t())  # (N, out) int32
        y = acc.float() * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the decoder's, cross-attention layers', connector's and output head's
    ``nn.Linear`` layers with ``Int8Linear``, in place; returns the model."""
    dec = model.decoder
    if dec.embed_tokens.weight.device.type != "cpu":
        raise ConfigError("int8 quantization runs on the CPU only")
    if dec.lm_head.weight is dec.embed_tokens.weight:
        dec.lm_head = nn.Linear(dec.lm_head.in_features, dec.lm_head.out_features, bias=False)
        dec.lm_head.weight = nn.Parameter(dec.embed_tokens.weight.detach().clone())  # untie: only the head is int8
        dec.tie_embeddings = False
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and name.startswith(("decoder.", "connectors."))]
    for name in targets:  # by name, so each float32 weight is freed as soon as it is replaced
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, Int8Linear(getattr(parent, child_name)))
    model.quantized = "int8"
    return model
