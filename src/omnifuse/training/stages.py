"""Training stages and the parameter groups each one trains.

Groups of a ``MultimodalModel``: ``encoder`` (every modality's encoder), ``connector``, ``fusion``
(gated cross-attention layers), ``decoder`` (embeddings, self-attention layers, norm, head).
``encoder.<modality>`` names one modality's encoder alone (``encoder.audio``; ``encoder.video`` is
the video encoder's own parameters, its frames going through the image encoder). Stages follow
LLaVA's recipe (align: connector only; instruct: connector + language model) extended to
cross-attention models, where the fusion layers are the new part and train with the connector.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["STAGES", "Stage", "parameter_group", "set_trainable"]

_GROUP_PREFIXES = {
    "encoder": ("encoders.",),
    "connector": ("connectors.",),
    "fusion": ("decoder.cross_layers.",),
    "decoder": ("decoder.embed_tokens.", "decoder.layers.", "decoder.norm.", "decoder.lm_head."),
}


@dataclass(frozen=True)
class Stage:
    name: str
    groups: tuple[str, ...]  # parameter groups that learn; everything else is frozen
    loss: str  # "next_token" or "contrastive"


STAGES = {
    "contrastive": Stage("contrastive", ("encoder",), "contrastive"),  # CLIP / SigLIP pre-training of the encoder
    "align": Stage("align", ("connector", "fusion"), "next_token"),  # LLaVA stage 1: captions, encoder and LM frozen
    "instruct": Stage("instruct", ("connector", "fusion", "decoder"), "next_token"),  # LLaVA stage 2
}


def parameter_group(name: str) -> str:
    for group, prefixes in _GROUP_PREFIXES.items():
        if name.startswith(prefixes):
            return group
    raise KeyError(f"parameter {name!r} belongs to no group")


def set_trainable(model: nn.Module, groups: tuple[str, ...]) -> dict[str, int]:
    """Freeze everything but ``groups``; returns trainable parameter counts per group."""
    counts = {g: 0 for g in groups}
    for name, p in model.named_parameters():
        group = parameter_group(name)
        if group == "encoder" and group not in groups:
            group = f"encoder.{name.split('.')[1]}"  # encoders.<modality>.…
        p.requires_grad_(group in groups)
        if group in groups:
            counts[group] += p.numel()
    return counts
