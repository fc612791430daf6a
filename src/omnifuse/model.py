"""The multimodal model: media encoders and connectors keyed by modality -> fusion strategy -> text decoder."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from omnifuse.config import ConfigError, ModelConfig
from omnifuse.decoder import TextDecoder, build_decoder
from omnifuse.fusion import FeatureCountError
from omnifuse.fusion.strategy import fusion_strategy
from omnifuse.inference.cache import InferenceCache
from omnifuse.modalities import MODALITIES
from omnifuse.processing.image import ImageProcessor, ProcessedImage

__all__ = ["MultimodalModel", "build_model", "ensure_model_fits"]


class MultimodalModel(nn.Module):
    """Media encoders and connectors keyed by modality, a fusion strategy, and a text decoder.

    ``forward(input_ids, attention_mask, images, cache)`` returns logits. ``images`` is one list per
    row of media items (``processing.media.MediaItem``), in prompt order; each item's placeholder
    token takes ``fusion.placeholder_tokens(item.num_tokens)`` positions in ``input_ids``. Early
    fusion: one per media token; cross fusion: one per item, where the text that may read it begins.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict()
        self.connectors = nn.ModuleDict()
        self.processors: dict = {}
        self.connector_of: dict[str, str] = {}  # modality -> the key of the connector it uses
        for modality in config.media_parts:  # the registry builds each modality's parts (modalities.py)
            parts = MODALITIES[modality]
            self.encoders[modality] = parts.encoder(config)
            if parts.connector is not None:
                self.connectors[modality] = parts.connector(config)
            self.connector_of[modality] = parts.shares_connector or modality
            if modality in config.modalities:  # an input the model takes (else only its parts are used)
                self.processors[modality] = parts.processor(config)
        for encoder in self.encoders.values():  # encoders that use another modality's (video: image)
            if hasattr(encoder, "attach"):
                encoder.attach(self.encoders)
        # Registered after the encoders and connectors: parameter order (which a saved optimizer
        # state follows) is the same as before the decoder was a module of its own.
        self.decoder: TextDecoder = build_decoder(config)
        self.fusion = fusion_strategy(config.fusion)
        text = config.text
        missing = [m for m in config.modalities if m not in text.placeholder_ids]
        if missing:
            m = missing[0]
            raise ConfigError(f"text.placeholder_ids has no id for the {m} placeholder "
                              f"{text.placeholder_tokens.get(m)!r}: give it in the config, or build the model "
                              "from processing.text.with_placeholder_ids(config, tokenizer)")
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if getattr(m, "keeps_default_init", False):
                m.reset_parameters()  # e.g. a convolutional stem (encoders/vit.py)
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        for m in self.modules():  # what only the module knows: position and class embeddings
            if hasattr(m, "init_parameters"):
                m.init_parameters(std)
        # Norm weights start at one (module defaults) and fusion gates at zero (TanhGate).

    def set_token_merging(self, r: int) -> None:
        """Merge ``r`` tokens in each vision encoder layer from now on (ToMe, encoders/tome.py; 0:
        off), at inference with the same weights: the config, the encoder and the processors'
        token counts change together. A connector that needs the patch grid refuses it."""
        if self.config.vision is None:
            raise ConfigError("token merging needs a model with a vision encoder")
        config = dataclasses.replace(self.config, vision=dataclasses.replace(self.config.vision, merge_tokens=r))
        self.config = config
        self.encoders["image"].merge_tokens = r
        for modality in self.processors:
            self.processors[modality] = MODALITIES[modality].processor(config)

    @property
    def vision_encoder(self) -> nn.Module | None:
        return self.encoders["image"] if "image" in self.encoders else None  # noqa: SIM401 (no ModuleDict.get)

    @property
    def connector(self) -> nn.Module | None:
        return self.connectors["image"] if "image" in self.connectors else None  # noqa: SIM401

    @property
    def image_processor(self) -> ImageProcessor | None:
        return self.processors.get("image")

    @property
    def placeholder_ids(self) -> dict[str, int]:
        """Modality -> id of its placeholder token, for the modalities this model takes (config.text)."""
        ids = self.config.text.placeholder_ids
        return {m: ids[m] for m in self.config.modalities}

    @property
    def cross_layers(self) -> nn.ModuleDict:
        return self.decoder.cross_layers

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> InferenceCache:
        return InferenceCache(self.decoder.new_cache(batch_size, max_len))

    # ------------------------------------------------------------------ media
    def _encoder(self, modality: str) -> nn.Module:
        if modality not in self.encoders:
            raise FeatureCountError(f"{self.config.name} takes no {modality} input"
                                    + ("; it is a text-only model" if not len(self.encoders) else
                                       f" (it takes {', '.join(self.encoders)})"))
        return self.encoders[modality]

    def media_features(self, items: list) -> list[torch.Tensor]:
        """Each item's encoder output (its inputs' leading axis first): reused where the item
        already carries it (``features``, from a frozen encoder), else computed, items of one
        modality and input shape in one batch."""
        out: list[torch.Tensor | None] = [item.features for item in items]
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            if out[i] is None:
                shapes = tuple((k, tuple(v.shape[1:])) for k, v in sorted(item.inputs.items()))
                groups.setdefault((item.modality, shapes), []).append(i)
        for (modality, _), idx in groups.items():
            encoder = self._encoder(modality)
            names = items[idx[0]].inputs
            batch = {k: torch.cat([items[i].inputs[k] for i in idx]).to(self.device) for k in names}
            sizes = [next(iter(items[i].inputs.values())).shape[0] for i in idx]
            for i, f in zip(idx, encoder(**batch).split(sizes)):
                out[i] = f
        return out  # type: ignore[return-value]

    def encode_media(self, items: list) -> list[torch.Tensor]:
        """Encoder + connector for each media item: a list of (num_tokens, D_decoder)."""
        if not items:
            return []
        feats = self.media_features(items)
        out: list[torch.Tensor | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (item, f) in enumerate(zip(items, feats)):
            grid = MODALITIES[item.modality].feature_grid(self.config, item)
            groups.setdefault((item.modality, tuple(f.shape[1:]), grid), []).append(i)
        for (modality, _, grid), idx in groups.items():  # outputs of one shape share the connector's batch
            connector = self.connectors[self.connector_of[modality]]
            extra = {}
            if getattr(connector, "reads_instruction", False):
                extra["instruction"] = self._instructions([items[i] for i in idx], [feats[i].shape[0] for i in idx])
            tokens = connector(torch.cat([feats[i].to(self.device) for i in idx]), grid=grid, **extra)  # (N, ..., D)
            for i, f in zip(idx, tokens.split([feats[i].shape[0] for i in idx])):
                f = f.reshape(-1, f.shape[-1])
                keep = items[i].keep
                out[i] = f if keep is None else f[keep.to(f.device)]
        for item, f in zip(items, out):
            if f.shape[0] != item.num_tokens:  # ARCHITECTURE.md contract 2: num_tokens is what the model produces
                raise FeatureCountError(f"a {item.modality} item produced {f.shape[0]} tokens but its processor "
                                        f"predicted {item.num_tokens}")
        return out  # type: ignore[return-value]


    def _instructions(self, items: list, crops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (N, L), mask (N, L)) of the items' instructions, one row per crop, right-padded."""
        missing = [k for k, item in enumerate(items) if getattr(item, "instruction", None) is None]
        if missing:
            raise FeatureCountError(f"{self.config.name}'s connector reads the prompt with each image "
                                    f"(text.instruction_tokenizer) but {len(missing)} of {len(items)} images came "
                                    "without instruction ids; build prompts through Pipeline.prompt_and_media")
        rows = [item.instruction for item, n in zip(items, crops) for _ in range(n)]
        longest = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = row, True
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token, 0 = left padding
        images: list[list[ProcessedImage]] | None = None,
        cache: InferenceCache | None = None,
        last_only: bool = False,
        outputs: torch.Tensor | None = None,  # (B, K) long: the positions whose logits are wanted
    ) -> torch.Tensor:  # (B, T, V), (B, 1, V) with last_only, (B, K, V) with outputs
        """``outputs`` (training): the last layer computes only the positions whose logits a loss
        reads (answer tokens are a few of a row's positions) while every position stays a key;
        the result equals the full pass at those positions."""
        b = input_ids.shape[0]
        image_features = attendable = None
        if images is not None:
            if len(images) != b:
                raise FeatureCountError(f"got images for {len(images)} rows but the batch has {b}")
            flat = self.encode_media([item for row in images for item in row])
            it = iter(flat)
            image_features = [[next(it) for _ in row] for row in images]
            attendable = [[item.attendable for item in row] for row in images]
        x = self.decoder.embed_tokens(input_ids)  # (B, T, D)
        decoding = cache is not None and cache.self_attn.length > 0
        x, cross = self.fusion.enter(self, x, input_ids, image_features, attendable, cache, decoding)
        return self.decoder(attention_mask=attention_mask, cache=cache.self_attn if cache is not None else None,
                            inputs_embeds=x, cross=cross, last_only=last_only, outputs=outputs)


def build_model(config: ModelConfig) -> MultimodalModel:
    return MultimodalModel(config)


def ensure_model_fits(config: ModelConfig, what: str, copies: int = 1, device: str | torch.device = "cpu") -> None:
    """Refuse, before allocating anything, a model whose float32 tensors (times ``copies``: 4 for
    training with AdamW = weights, gradients and two moments) exceed the memory available."""
    from omnifuse.machine import ensure_fits, tensor_bytes

    with torch.device("meta"):
        model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    ensure_fits(copies * tensor_bytes(model), f"{what} ({params:,} float32 parameters"
                                              f"{f' x {copies} for training' if copies > 1 else ''})", device)
