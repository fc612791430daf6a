"""Prompt + media in, text out: tokenizer, media processors and model wired together."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnifuse.checkpoint import load_checkpoint
from omnifuse.config import ConfigError
from omnifuse.errors import RequestError, TokenizerError
from omnifuse.inference import SamplingConfig, generate_stream
from omnifuse.inference.quantize import quantize_int8
from omnifuse.model import MultimodalModel, build_model, ensure_model_fits
from omnifuse.nn.packed import pack_linears
from omnifuse.planner.costs import (
    RequestCost,
    images_seen_at_decode,
    item_cost,
    request_cost,
)
from omnifuse.presets import get_preset
from omnifuse.processing.image import ProcessedImage
from omnifuse.processing.prompt import PromptLayout
from omnifuse.processing.text import InstructionTokenizer, Tokenizer, load_instruction_tokenizer, load_tokenizer
from omnifuse.runtime import choose_device, choose_dtype

__all__ = ["GenerationResult", "Pipeline"]


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # every generated id, a final stop token included (text leaves it out)
    prompt_tokens: int  # context positions the prompt takes, visual tokens included for early fusion
    visual_tokens: int  # all images: tokens in the context (early) or states encoded at prefill (cross)
    finish_reason: str  # "stop" or "length"
    # The cache held while decoding: self-attention K/V of prompt + output, plus the cross-attention
    # K/V of the states attended at decode (planner/costs.py, as `omnifuse info` and `plan`).
    kv_cache_bytes: int
    images: list[dict] = field(default_factory=list)  # per image: size, tokens, tiles
    audio: list[dict] = field(default_factory=list)  # per clip: seconds, chunks, tokens
    videos: list[dict] = field(default_factory=list)  # per video: seconds, fps, frames, timestamps, tokens
    cross_attention_states_prefill: int = 0  # encoded and cached at prefill (Mllama: padding tiles too)
    cross_attention_states_decode: int = 0  # attended at decode: all the decode cache keeps
    # self_attention, cross_attention_prefill, cross_attention_decode
    kv_cache_bytes_by_kind: dict[str, int] = field(default_factory=dict)


class Pipeline:
    def __init__(self, model: MultimodalModel, tokenizer: Tokenizer,
                 stop_token_ids: tuple[int, ...] | None = None,
                 instruction_tokenizer: InstructionTokenizer | None = None) -> None:
        """The model runs as given (its device and dtype); faster CPU kernels are explicit steps:
        ``pack()`` and ``quantize("int8")``. ``instruction_tokenizer``: the tokenizer of a connector
        that reads the prompt with each image (InstructBLIP's Q-Former)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.instruction_tokenizer = instruction_tokenizer
        vocab = model.config.connector.instruction_vocab_size
        if vocab and instruction_tokenizer is None:
            raise TokenizerError(f"{model.config.name}'s connector reads the prompt with each image: it needs its "
                                 f"instruction tokenizer ({model.config.text.instruction_tokenizer!r})")
        if vocab and instruction_tokenizer.vocab_size > vocab:
            raise TokenizerError(f"the instruction tokenizer {instruction_tokenizer.path} has "
                                 f"{instruction_tokenizer.vocab_size} tokens but the connector embeds only {vocab}")
        self.layout = PromptLayout.for_model(model.config, tokenizer)
        self.processor = model.image_processor
        for modality, token_id in model.placeholder_ids.items():  # the model's ids are the tokenizer's
            if tokenizer.placeholder_id(modality) != token_id:
                raise TokenizerError(f"the model's {modality} token id {token_id} differs from the tokenizer's "
                                     f"id {tokenizer.placeholder_id(modality)} for "
                                     f"{model.config.text.placeholder_tokens[modality]!r}")
        # A checkpoint's generation_config.json decides when the reference stops; else the tokenizer's eos.
        self.stop_token_ids = tuple(stop_token_ids) if stop_token_ids else tuple(tokenizer.eos_token_ids)
        rows = model.config.decoder.vocab_size + model.config.decoder.extra_embeddings
        if tokenizer.vocab_size > rows:
            raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {rows}")

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Pipeline:
        """A randomly initialised preset (seeded, so the same name and seed give the same weights)."""
        config = get_preset(name)
        ensure_model_fits(config, f"preset {name!r}", device=device)
        torch.manual_seed(seed)
        return cls(build_model(config).to(device=device, dtype=dtype), load_tokenizer(config.text))

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Pipeline:
        """An omnifuse checkpoint, or a Hugging Face folder (Llama, LLaVA, Mllama) with its tokenizer."""
        from omnifuse.interop import is_hf_checkpoint, load_hf_model

        stops = None
        if is_hf_checkpoint(folder):
            model, stops = load_hf_model(folder, device=device)
        else:
            model = load_checkpoint(folder, device=device)
        text = model.config.text
        return cls(model.to(dtype=dtype), load_tokenizer(text, folder), stops, load_instruction_tokenizer(text, folder))

    # ------------------------------------------------------------------ faster kernels (explicit)
    def pack(self) -> Pipeline:
        """oneDNN-packed float32 linears on the CPU (inference only; about 2x faster GEMMs, the
        same results to ~1e-6). A model on another device or in another dtype is left as it is."""
        if self.model.device.type == "cpu" and self.model.decoder.embed_tokens.weight.dtype == torch.float32:
            pack_linears(self.model)
        return self

    def merge_tokens(self, r: int) -> Pipeline:
        """Token merging in the vision encoder (ToMe: ``r`` tokens merged per layer, no training;
        fewer image tokens, a faster encoder and prefill, a smaller cache)."""
        self.model.set_token_merging(r)
        self.processor = self.model.image_processor
        return self

    def quantize(self, kind: str = "int8") -> Pipeline:
        """Dynamic int8 decoder, connector and output-head weights (CPU; about 2x faster decode)."""
        if kind != "int8":
            raise ConfigError(f"quantize must be int8, got {kind!r}")
        quantize_int8(self.model)
        return self

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, prompt: str, images: Sequence[ProcessedImage] = (), chat: bool = False) -> list[int]:
        """Token ids for ``prompt`` with one placeholder per image (processing/prompt.py).

        A prompt without placeholders gets them in front (LLaVA's ``<image>\\n`` convention);
        otherwise the prompt's placeholders must equal the number of images. Early fusion expands
        each placeholder to its image's token count.
        """
        return self.prompt_and_media(prompt, {"image": list(images)}, chat)[0]

    def prompt_and_media(self, prompt: str, media: dict[str, Sequence], chat: bool = False) -> tuple[list[int], list]:
        """(token ids, the media items in prompt order) for ``prompt`` and processed ``media`` per
        modality (``{"image": [...], "audio": [...]}``): the k-th placeholder of a modality is its
        k-th item; a modality without placeholders in the prompt goes in front."""
        ids, order = self.layout.encode_with_order(prompt, media, chat)
        items = [media[m][k] for m, k in order]
        if self.instruction_tokenizer is not None and items:
            items = [self._with_instruction(item, prompt) for item in items]
        return ids, items

    def conversation_and_media(self, messages: Sequence[dict], media: dict[str, Sequence]
                               ) -> tuple[list[int], list, list[tuple[str, int]]]:
        """(token ids, the media items in conversation order, that order as (modality, index within
        the modality)) for ``messages`` (``[{"role", "content": str}]``, each item's placeholder in
        a user turn) rendered with the chat template."""
        ids, order = self.layout.encode_conversation_with_order(messages, media)
        items = [media[m][k] for m, k in order]
        if self.instruction_tokenizer is not None and items:
            text = "\n".join(m["content"] for m in messages if m["role"] == "user")
            items = [self._with_instruction(item, text) for item in items]
        return ids, items, order

    def _with_instruction(self, item, prompt: str):
        """The image with the prompt in its connector's vocabulary: the text as the user gave it, the
        image placeholders left out (InstructBLIP's processor hands its Q-Former the text it was given,
        which holds none: it puts the image tokens in front itself)."""
        if item.modality != "image":
            return item
        text = " ".join(prompt.replace(self.layout.image_token, " ").split())
        ids = self.instruction_tokenizer.encode(text)
        most = self.model.config.connector.instruction_positions
        if len(ids) > most:
            raise RequestError(f"the prompt is {len(ids)} tokens in the Q-Former's vocabulary; it reads at most {most}")
        return dataclasses.replace(item, instruction=torch.tensor(ids, dtype=torch.long))

    def process(self, modality: str, sources: Sequence, **options) -> list:
        """Media items of ``modality`` from sources (paths, bytes, PIL images, (samples, rate) audio;
        ``options``: the processor's, e.g. ``fps`` and ``max_frames`` for video)."""
        if not sources:
            return []
        self.layout.check_modalities({modality: sources})
        return [self.model.processors[modality](s, **options) for s in sources]

    def process_images(self, sources: Sequence) -> list[ProcessedImage]:
        return self.process("image", sources)

    def cache_bytes(self, prompt_ids: Sequence[int], images: Sequence, output_tokens: int) -> RequestCost:
        """Media states and cache bytes of one request (planner/costs.py, as ``omnifuse info`` and
        ``plan``): prompt and output positions, and the cross-attention states its media items (in
        prompt order) give at prefill and its last prompt token attends to at decode."""
        config = self.model.config
        costs = [item_cost(config, item, self.model.processors) for item in images]
        seen = None
        if not self.model.fusion.in_sequence:  # which items the decode cache keeps
            seen = images_seen_at_decode(config, prompt_ids, list(self.model.placeholder_ids.values()), len(images))
        weight = next(p for p in self.model.parameters() if p.is_floating_point())  # the cache's dtype
        return request_cost(config, len(prompt_ids) + output_tokens, costs, weight.element_size(), seen)

    # ------------------------------------------------------------------ generation
    def sampling(self, **kwargs) -> SamplingConfig:
        kwargs.setdefault("stop_token_ids", self.stop_token_ids)
        return SamplingConfig(**kwargs)

    def generate_batch(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None,
                       sampling: SamplingConfig | None = None, chat: bool = False,
                       on_token: Callable[[int, int], None] | None = None,
                       audio: Sequence[Sequence] | None = None, video: Sequence[Sequence] | None = None,
                       fps: float | None = None, max_frames: int | None = None) -> list[GenerationResult]:
        """Generate for several prompts at once (left-padded). ``images[i]`` are prompt i's image
        sources (paths, bytes or PIL images), ``audio[i]`` its clips (paths, bytes or (samples,
        rate)), ``video[i]`` its videos (paths or bytes; sampled at ``fps``, at most ``max_frames``,
        the config's by default). ``on_token(row, id)`` is called as tokens arrive (streaming)."""
        sampling = sampling or self.sampling()
        empty = [[] for _ in prompts]
        sources = {"image": images or empty, "audio": audio or empty, "video": video or empty}
        for modality, lists in sources.items():
            if len(lists) != len(prompts):
                raise RequestError(f"{len(prompts)} prompts but {len(lists)} {modality} lists")
        options = {"video": {k: v for k, v in (("fps", fps), ("max_frames", max_frames)) if v is not None}}
        media = [{m: self.process(m, lists[r], **options.get(m, {})) for m, lists in sources.items()}
                 for r in range(len(prompts))]
        encoded = [self.prompt_and_media(p, row, chat) for p, row in zip(prompts, media)]
        rows = [ids for ids, _ in encoded]
        processed = [items for _, items in encoded]
        has_images = any(processed)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stops = set(sampling.stop_token_ids)
        for step in generate_stream(self.model, rows, processed if has_images else None, sampling,
                                    pad_id=self.tokenizer.pad_token_id):
            for r in range(len(prompts)):
                if not bool(step.active[r]):
                    continue
                tok = int(step.tokens[r])
                out[r].append(tok)  # the stop token too, as the reference's generate returns it
                if tok in stops:
                    done[r] = True
                    continue
                if on_token is not None:
                    on_token(r, tok)
        results = []
        for toks, ids, imgs, d in zip(out, rows, processed, done):
            cost = self.cache_bytes(ids, imgs, len(toks))
            results.append(GenerationResult(
                text=self.tokenizer.decode(toks[:-1] if d else toks),
                tokens=toks,
                prompt_tokens=len(ids),
                visual_tokens=cost.visual_tokens,
                finish_reason="stop" if d else "length",
                kv_cache_bytes=cost.kv_cache_bytes.decode,
                images=[{"width": img.original_size[0], "height": img.original_size[1], "tokens": img.num_tokens,
                         "crops": int(img.pixel_values.shape[0]), "tiles": list(img.tiles)}
                        for img in imgs if img.modality == "image"],
                audio=[{"seconds": round(clip.seconds, 4), "samples": clip.num_samples,
                        "chunks": int(clip.inputs["audio_frames"].shape[0]), "tokens": clip.num_tokens}
                       for clip in imgs if clip.modality == "audio"],
                videos=[{"seconds": round(v.duration, 4), "fps": v.fps, "frames": len(v.timestamps),
                         "timestamps": list(v.timestamps), "width": v.size[0], "height": v.size[1],
                         "tokens": v.num_tokens} for v in imgs if v.modality == "video"],
                cross_attention_states_prefill=cost.cross_attention_states_prefill,
                cross_attention_states_decode=cost.cross_attention_states_decode,
                kv_cache_bytes_by_kind=cost.kv_cache_bytes.as_dict(),
            ))
        return results

    def generate(self, prompt: str, images: Sequence = (), sampling: SamplingConfig | None = None,
                 chat: bool = False, on_token: Callable[[int], None] | None = None,
                 audio: Sequence = (), video: Sequence = (), fps: float | None = None,
                 max_frames: int | None = None) -> GenerationResult:
        callback = (lambda _row, tok: on_token(tok)) if on_token is not None else None
        return self.generate_batch([prompt], [list(images)], sampling, chat, callback, [list(audio)], [list(video)],
                                   fps, max_frames)[0]


def load_pipeline(*, preset: str | None = None, checkpoint: str | Path | None = None, device: str | None = None,
                  dtype: str | None = None, quantize: str | None = None, merge_tokens: int = 0,
                  seed: int = 0) -> Pipeline:
    """The pipeline ``omnifuse generate`` and ``omnifuse serve`` run: a preset (seeded random weights)
    or a checkpoint folder, on ``device`` in ``dtype`` (names; None picks as ``runtime`` does), with
    token merging, int8 weights and packed float32 linears as asked."""
    if (preset is None) == (checkpoint is None):
        raise ConfigError("give a preset or a checkpoint folder (one of them)")
    device_ = choose_device(device)
    dtype_ = choose_dtype(dtype, device_)
    if quantize and (device_.type != "cpu" or dtype_ != torch.float32):
        raise ConfigError("--quantize int8 runs on the CPU in float32 (no --device cuda or --dtype)")
    if preset is not None:
        pipe = Pipeline.from_preset(preset, seed=seed, device=device_, dtype=dtype_)
    else:
        pipe = Pipeline.from_checkpoint(checkpoint, device=device_, dtype=dtype_)
    if merge_tokens:
        pipe.merge_tokens(merge_tokens)
    return (pipe.quantize(quantize) if quantize else pipe).pack()  # pack: the linears int8 left
