"""Mixture-of-experts feed-forward: a router sends each token to ``top_k`` of ``num_experts``
SwiGLU experts (no token is dropped), optionally beside an always-on shared expert.

Two routers, as the published models define them:

- ``softmax`` (Mixtral): softmax over all experts' logits, the top-k kept and renormalised; each
  chosen expert's output is scaled by its weight.
- ``sigmoid`` (Llama 4): the top-k logits, each through a sigmoid, scale the chosen expert's
  *input*; the output is the expert's output as is.

Only the experts a batch routes to run, each on just its tokens (gathered, computed, added back),
so a forward costs the routed experts, not all of them. The experts are plain SwiGLU blocks of
``nn.Linear``: int8 quantisation and packed float32 linears apply to them as to a dense layer.

In training, ``aux_loss`` holds the last forward's load-balancing loss (Switch Transformer /
Mixtral: ``num_experts * sum_e f_e * P_e``, f the share of routed slots, P the mean router
probability) and ``z_loss`` the router z-loss (mean squared logsumexp of the logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnifuse.nn.mlp import SwiGLU

__all__ = ["ROUTERS", "MoE"]

ROUTERS = ("softmax", "sigmoid")


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 1, router: str = "softmax",
                 shared_hidden: int = 0) -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router {router!r} unknown; known: {', '.join(ROUTERS)}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the experts), got {top_k}")
        self.num_experts, self.top_k, self.router_kind = num_experts, top_k, router
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))
        self.shared_expert = SwiGLU(dim, shared_hidden) if shared_hidden else None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> the router's logits (N, E), the chosen experts (N, k) and their weights (N, k)."""
        logits = self.router(x)
        if self.router_kind == "softmax":
            probs = logits.float().softmax(dim=-1)
            weights, chosen = probs.topk(self.top_k, dim=-1)
            weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        else:
            top, chosen = logits.topk(self.top_k, dim=-1)
            weights = torch.sigmoid(top.float()).to(x.dtype)
        return logits, chosen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, chosen, weights = self.route(flat)
        if flat.shape[0] == 1 and not self.training:  # one token (decoding at batch 1): no grouping
            out = None
            for e, w in zip(chosen[0].tolist(), weights[0, :, None], strict=True):
                y = self.experts[e](flat) * w if self.router_kind == "softmax" else self.experts[e](flat * w)
                out = y if out is None else out + y
            if self.shared_expert is not None:
                out = out + self.shared_expert(flat)
            return out.reshape(shape)
        out = torch.zeros_like(flat)
        slot_expert = chosen.reshape(-1)  # (N*k,): the expert of each routed slot
        order = slot_expert.argsort(stable=True)  # slots grouped by expert
        counts = torch.bincount(slot_expert, minlength=self.num_experts).tolist()
        token_of = order // self.top_k  # each grouped slot's token
        slot_weight = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:  # no token chose it: it does not run
                continue
            tokens = token_of[start:start + n]
            w = slot_weight[start:start + n, None]
            if self.router_kind == "softmax":
                y = self.experts[e](flat[tokens]) * w
            else:  # Llama 4: the router's weight scales the expert's input
                y = self.experts[e](flat[tokens] * w)
            out.index_add_(0, tokens, y)
            start += n
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        if self.training:
            self._losses(logits, chosen)
        return out.reshape(shape)

    def _losses(self, logits: torch.Tensor, chosen: torch.Tensor) -> None:
        probs = logits.float().softmax(dim=-1)  # (N, E)
        routed = F.one_hot(chosen, self.num_experts).float().sum(dim=1)  # (N, E): slots per token and expert
        share = routed.mean(dim=0) / self.top_k  # f_e: the share of routed slots that went to e
        self.aux_loss = self.num_experts * (share * probs.mean(dim=0)).sum()
        self.z_loss = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
