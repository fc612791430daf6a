"""Reading Hugging Face checkpoint folders: config, (sharded) safetensors, key maps.

A key map is a list of ``(pattern, replacement)`` regexes applied to normalised checkpoint keys;
a replacement of ``None`` marks a tensor the model knowingly does not use (e.g. CLIP's pooled-output
norm when LLaVA reads an inner layer). Three replacements transform the tensor on the way: ``Split``
cuts one checkpoint tensor into several model tensors (a fused q/k/v projection), ``Reshaped``
gives it the model tensor's shape (BLIP's ``(1, 1, D)`` class embedding), ``Rows`` puts several
checkpoint tensors into one model tensor (IDEFICS's extra vocabulary rows). Tensors are read one at
a time from memory-mapped files and copied into a model built on the meta device, so a checkpoint is
never held twice.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from omnifuse.checkpoint import CheckpointError, missing_keys, parameter_count, raise_if_mismatched, read_config_json
from omnifuse.config import CLIP_MEAN, CLIP_STD, ImageConfig

__all__ = [
    "KeyMap",
    "Mapped",
    "Reshaped",
    "Rows",
    "Split",
    "Stacked",
    "build_on_meta",
    "check_pixel_steps",
    "iter_safetensors",
    "llama_decoder_key_map",
    "load_mapped",
    "read_hf_config",
    "read_image_processor_config",
    "rope_settings",
    "square_stretch_config",
    "vision_activation",
]



@dataclass(frozen=True)
class Split:
    """A checkpoint tensor that fills ``targets`` in order, cut into equal chunks along dim 0
    (BLIP's fused ``qkv`` projection -> q, k and v). Targets are regex replacement templates."""

    targets: tuple[str, ...]


@dataclass(frozen=True)
class Reshaped:
    """A checkpoint tensor copied into ``target`` with the model tensor's shape: the same elements
    in the same order, only leading or trailing singleton axes differ."""

    target: str


@dataclass(frozen=True)
class Rows:
    """A checkpoint tensor that fills ``target``'s rows from ``start`` on (dim 0): two checkpoint
    tensors that are one model tensor (IDEFICS's ``additional_embedding`` after ``embed_tokens``).
    Every row of the target must be filled exactly once."""

    target: str
    start: int


@dataclass(frozen=True)
class Stacked:
    """A checkpoint tensor (E, ...) holding one matrix per expert, stored input-major when
    ``transpose`` (Llama 4's fused ``gate_up_proj`` (E, D, 2I)): expert e's matrix (transposed)
    is cut along dim 0 into ``targets``, templates in which ``{e}`` stands for the expert."""

    targets: tuple[str, ...]
    transpose: bool = True


@dataclass(frozen=True)
class Mapped:
    """A checkpoint tensor copied into ``target`` through ``fn``: a permutation of rows (interleaved
    RoPE pairs into omnifuse's half-split layout) or another view of the same elements (an unfold
    patch embedding's linear as a convolution's weight). ``fn``'s output shape, worked out on the
    meta device, must be the model tensor's."""

    target: str
    fn: Callable[[torch.Tensor], torch.Tensor]


KeyMap = list[tuple[str, "str | Split | Reshaped | Rows | Stacked | Mapped | None"]]
Piece = Callable[[torch.Tensor], torch.Tensor]  # the part of a checkpoint tensor one model tensor takes
Fill = tuple[str, Piece, "slice | None"]  # (model key, its part of the checkpoint tensor, the rows it fills)


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    data = read_config_json(folder)
    if not isinstance(data, dict):
        raise CheckpointError(f"{Path(folder) / 'config.json'} must hold a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or every shard named by ``model.safetensors.index.json``."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (needs \"weight_map\"): {e}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing shard files named in {index.name}: {missing}")
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder} has only pickle weights (.bin/.pt); omnifuse reads safetensors only "
                              "(convert with transformers: save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(key, lazy slice handle) for every tensor; nothing is read until asked."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}") from None
        with handle as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f


def _map_key(key: str, key_map: KeyMap) -> tuple[bool, list[tuple[str, Any]] | None]:
    """(whether the map knows ``key``, the (model key, replacement) pairs it fills or None when unused)."""
    for pattern, repl in key_map:
        m = re.fullmatch(pattern, key)
        if not m:
            continue
        if repl is None:
            return True, None
        if isinstance(repl, (Split, Stacked)):
            return True, [(m.expand(t), repl) for t in repl.targets]
        return True, [(m.expand(repl if isinstance(repl, str) else repl.target), repl)]
    return False, None


def _pieces(shape: tuple[int, ...], repl: Any, targets: list[tuple[str, Any]],
            own: dict[str, torch.Tensor]) -> tuple[list[Fill], list[str]]:
    """What each target takes from the checkpoint tensor, and the shape mismatches as messages."""
    if isinstance(repl, Split):
        n = len(targets)
        if shape[0] % n:
            return [], [f"file {shape} does not split into {n} equal parts along dim 0"]
        step = shape[0] // n
        part = (step, *shape[1:])
        out, bad = [], []
        for i, (name, _) in enumerate(targets):
            if part != tuple(own[name].shape):
                bad.append(f"-> {name}: part {part} vs model {tuple(own[name].shape)}")
            out.append((name, lambda t, i=i: t[i * step:(i + 1) * step], None))
        return out, bad
    if isinstance(repl, Stacked):
        out, bad = [], []
        per = len(repl.targets)
        matrix = (shape[2], shape[1]) if repl.transpose and len(shape) == 3 else shape[1:]
        if matrix[0] % per:
            return [], [f"file {shape}: an expert's {matrix} does not split into {per} equal parts along dim 0"]
        step = matrix[0] // per
        for j, (name, _) in enumerate(targets):
            e, i = divmod(j, per)
            part = (step, *matrix[1:])
            if part != tuple(own[name].shape):
                bad.append(f"-> {name}: part {part} vs model {tuple(own[name].shape)}")
            out.append((name, lambda t, e=e, i=i: (t[e].T if repl.transpose else t[e])[i * step:(i + 1) * step], None))
        return out, bad
    name = targets[0][0]
    want = tuple(own[name].shape)
    if isinstance(repl, Mapped):
        try:
            out = tuple(repl.fn(torch.empty(shape, device="meta")).shape)
        except RuntimeError:
            out = None
        return ([(name, repl.fn, None)], []) if out == want else ([], [f"file {shape} -> {out} vs model {want}"])
    if isinstance(repl, Rows):
        rows = slice(repl.start, repl.start + shape[0])
        if shape[1:] != want[1:] or rows.stop > want[0]:
            return [], [f"file {shape} as rows {rows.start}..{rows.stop - 1} of model {want}"]
        return [(name, lambda t: t, rows)], []
    if isinstance(repl, Reshaped):
        if math.prod(shape) != math.prod(want) or [d for d in shape if d != 1] != [d for d in want if d != 1]:
            return [], [f"file {shape} vs model {want}"]
        return [(name, lambda t: t.reshape(want), None)], []
    if shape != want:
        return [], [f"file {shape} vs model {want}"]
    return [(name, lambda t: t, None)], []


def _row_gaps(plan: dict[str, list[Fill]], own: dict[str, torch.Tensor]) -> list[str]:
    """Model tensors filled by rows whose rows are not each filled exactly once, as messages."""
    covered: dict[str, list[int]] = {}
    for fills in plan.values():
        for name, _, rows in fills:
            if rows is not None:
                covered.setdefault(name, [0] * own[name].shape[0])
                for r in range(rows.start, rows.stop):
                    covered[name][r] += 1
    return [f"{name}: of its {len(counts)} rows, {counts.count(0)} are in no file tensor and "
            f"{sum(c > 1 for c in counts)} in more than one" for name, counts in covered.items()
            if any(c != 1 for c in counts)]


def load_mapped(model: torch.nn.Module, folder: str | Path, key_map: KeyMap, normalise=lambda k: k,
                device: str | torch.device = "cpu", zero_if_absent: str | None = None) -> torch.nn.Module:
    """Fill ``model``, built on the meta device, from the folder's safetensors through ``key_map``.

    Every key and shape is checked against the safetensors headers before anything is allocated:
    ``CheckpointError`` names every checkpoint key the map does not know, every model tensor
    nothing fills (missing) and every shape mismatch, so a config that does not describe the
    weights costs nothing. Then the model is allocated (if it fits in memory) and filled one
    tensor at a time. ``zero_if_absent``: a regex of model keys that are zero when the file leaves
    them out (a bias an older layout of the family fixed at zero). Returns the filled model.
    """
    from omnifuse.checkpoint import materialize

    folder = Path(folder)
    files = weight_files(folder)
    own = model.state_dict(keep_vars=True)
    plan: dict[str, list[Fill]] = {}  # checkpoint key -> what it fills
    unexpected, shapes = [], []
    present: set[str] = set()  # model keys the files hold, well shaped or not
    in_file = 0
    for key, handle in iter_safetensors(files):
        shape = tuple(handle.get_slice(key).get_shape())
        in_file += math.prod(shape)
        known, targets = _map_key(normalise(key), key_map)
        if not known:
            unexpected.append(key)
            continue
        if targets is None:
            continue  # deliberately unused
        if isinstance(targets[0][1], Stacked):  # one set of targets per expert
            targets = [(name.replace("{e}", str(e)), repl) for e in range(shape[0]) for name, repl in targets]
        absent = [name for name, _ in targets if name not in own]
        if absent:
            unexpected.append(f"{key} (-> {', '.join(absent)})")
            continue
        present.update(name for name, _ in targets)
        pieces, bad = _pieces(shape, targets[0][1], targets, own)
        if bad:
            shapes += [f"{key}: {b}" for b in bad]
        else:
            plan[key] = pieces
    shapes += _row_gaps(plan, own)
    zeroed = [k for k in missing_keys(own, present) if zero_if_absent and re.fullmatch(zero_if_absent, k)]
    raise_if_mismatched(str(folder), missing_keys(own, present | set(zeroed)), unexpected, shapes,
                        (parameter_count(own), in_file))
    model = materialize(model, device, f"the model in {folder}")
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in zeroed:
            own[name].data.zero_()
        for key, handle in iter_safetensors(files):
            for name, piece, rows in plan.get(key, ()):
                target = own[name].data if rows is None else own[name].data[rows]
                target.copy_(piece(handle.get_tensor(key)))  # converts dtype (bf16 file -> float32 model)
    return model


def build_on_meta(config) -> torch.nn.Module:
    """The model ``config`` describes, built on the meta device (no memory) for ``load_mapped``."""
    from omnifuse.model import build_model

    with torch.device("meta"):
        return build_model(config)


def llama_decoder_key_map(prefix: str) -> KeyMap:
    """A Llama text model's tensors (``{prefix}embed_tokens``, ``{prefix}layers.N``, ``{prefix}norm``,
    ``lm_head``) onto omnifuse's ``decoder.*``: the names after the prefix are the same."""
    p = re.escape(prefix)
    return [
        (rf"{p}embed_tokens\.weight", "decoder.embed_tokens.weight"),
        (rf"{p}layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
        (rf"{p}norm\.weight", "decoder.norm.weight"),
        (r"lm_head\.weight", "decoder.lm_head.weight"),
        (r".*rotary_emb\.inv_freq", None),
    ]


def rope_settings(text: dict[str, Any]) -> dict[str, Any]:
    """DecoderConfig RoPE fields from a HF text config (``rope_parameters`` in transformers 5,
    ``rope_theta`` + ``rope_scaling`` before)."""
    params = dict(text.get("rope_parameters") or {})
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = params if params.get("rope_type", "default") != "default" else scaling
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise CheckpointError(f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)")
    out.update(rope_type="llama3", rope_factor=float(source["factor"]),
               rope_low_freq_factor=float(source["low_freq_factor"]),
               rope_high_freq_factor=float(source["high_freq_factor"]),
               rope_original_max_position=int(source["original_max_position_embeddings"]))
    return out


def llama_decoder_kwargs(text: dict[str, Any]) -> dict[str, Any]:
    """DecoderConfig fields from a HF Llama text config; unsupported options are named."""
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"text hidden_act {text['hidden_act']!r} is not supported (Llama uses silu)")
    if text.get("mlp_bias"):
        raise CheckpointError("text mlp_bias=true is not supported")
    heads = text.get("num_attention_heads", 32)
    hidden = text.get("hidden_size", 4096)
    return dict(
        vocab_size=text.get("vocab_size", 32000),
        hidden_size=hidden,
        num_layers=text.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or hidden // heads,
        intermediate_size=text.get("intermediate_size", 11008),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position=text.get("max_position_embeddings", 2048),
        tie_embeddings=bool(text.get("tie_word_embeddings", False)),
        attention_bias=bool(text.get("attention_bias", False)),
        **rope_settings(text),
    )


def read_json_if_present(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def read_image_processor_config(folder: Path, section: str = "image_processor") -> tuple[dict[str, Any], str | None]:
    """(image processor settings, the file they came from) of a Hugging Face folder.

    transformers 5's ``processor.save_pretrained`` nests them in ``processor_config.json`` under
    ``image_processor``; transformers 4 (and image-processor-only saves) write
    ``preprocessor_config.json``. The nested section wins when both exist, as in transformers' own
    loader. ``({}, None)`` when the folder has neither: the caller must say which defaults it uses.
    """
    nested = read_json_if_present(folder / "processor_config.json").get(section)
    if nested is not None:
        if not isinstance(nested, dict):
            raise CheckpointError(f"{folder / 'processor_config.json'}: {section} must be a JSON object")
        return nested, "processor_config.json"
    if (folder / "preprocessor_config.json").is_file():
        return read_json_if_present(folder / "preprocessor_config.json"), "preprocessor_config.json"
    return {}, None


def check_pixel_steps(pre: dict[str, Any], where: str, family: str, resample: tuple[int, str],
                      flags: tuple[str, ...] = ("do_resize", "do_rescale", "do_normalize")) -> None:
    """Refuse processor settings omnifuse does not reproduce: another ``resample`` filter than the
    family's (``(id, name)``), or any of ``flags`` off, or a rescale other than 1/255."""
    if int(pre["resample"]) != resample[0]:
        raise CheckpointError(f"{where}: resample={pre['resample']} is not supported ({family} uses {resample[0]}, "
                              f"{resample[1]})")
    if not all(pre[f] for f in flags) or abs(float(pre["rescale_factor"]) - 1 / 255) > 1e-9:
        names = [f"{f} (1/255)" if f == "do_rescale" else f for f in flags]
        raise CheckpointError(f"{where}: only {', '.join(names[:-1])} and {names[-1]} all on are supported")


def square_stretch_config(folder: Path, side: int, defaults: dict[str, Any], family: str,
                          size_key: str | None = None) -> ImageConfig:
    """The ImageConfig of a processor that stretches every image to the vision tower's square with
    bicubic resampling (BLIP-2 / InstructBLIP, IDEFICS), from the folder's saved settings over the
    class ``defaults``. ``size_key``: a key that, when saved, overrides ``size`` (IDEFICS's
    ``image_size``). A folder without settings gets the defaults at ``side``, with a warning."""
    pre, source = read_image_processor_config(folder)
    if source is None:
        warn_processor_defaults(folder, f"{family} defaults (a bicubic stretch to {side} x {side}, mean {CLIP_MEAN}, "
                                        f"std {CLIP_STD})")
        return ImageConfig(mode="fixed", image_size=side, resize="resize")
    pre = {**defaults, **{k: v for k, v in pre.items() if v is not None}}
    where = f"{folder / source}"
    check_pixel_steps(pre, where, family, (3, "bicubic"))
    size = pre["size"]
    if size_key and pre.get(size_key):
        height = width = pre[size_key]
    else:
        height, width = (size.get("height"), size.get("width")) if isinstance(size, dict) else (None, None)
    if not height or height != width:
        accepted = f" or {size_key}" if size_key else ""
        raise CheckpointError(f"{where}: size {size} is not supported (a square {{\"height\": N, \"width\": N}}"
                              f"{accepted})")
    if int(height) != side:
        raise CheckpointError(f"{where}: images become {height} x {width} but the vision tower takes {side} x {side}")
    return ImageConfig(mode="fixed", image_size=side, resize="resize",
                       mean=per_channel(pre["image_mean"], f"{where}: image_mean"),
                       std=per_channel(pre["image_std"], f"{where}: image_std"))


def per_channel(value: Any, where: str) -> tuple[float, float, float]:
    """An ``image_mean`` / ``image_std`` setting as three floats (transformers also takes one number)."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise CheckpointError(f"{where} must be one number or three, got {value!r}")
    return out  # type: ignore[return-value]


def warn_processor_defaults(folder: Path, described: str) -> None:
    """A folder without processor settings is processed with ``described`` defaults: say so, loudly."""
    import warnings

    from omnifuse.config import LoudDefaultWarning

    warnings.warn(f"{folder} has no processor_config.json or preprocessor_config.json: images are processed "
                  f"with {described}; copy the reference processor's config into the folder to use its settings",
                  LoudDefaultWarning, stacklevel=3)


def stop_token_ids(folder: Path, config: dict[str, Any]) -> tuple[int, ...] | None:
    """Stop ids the reference would use: generation_config.json's eos_token_id, if any."""
    gen = read_json_if_present(folder / "generation_config.json")
    eos = gen.get("eos_token_id", None)
    if eos is None:
        return None
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def placeholder_text(folder: Path, token_id: int, default: str = "<image>") -> str:
    """The text of the placeholder token ``token_id`` in the folder's tokenizer.json (``default``
    when it has none)."""
    tok = read_json_if_present(folder / "tokenizer.json")
    for added in tok.get("added_tokens", []):
        if added.get("id") == token_id:
            return added["content"]
    vocab = tok.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        for text, i in vocab.items():
            if i == token_id:
                return text
    return default


def token_id_of(folder: Path, text: str) -> int | None:
    """The id of the token ``text`` in the folder's tokenizer.json (an added token or a vocabulary
    entry), or None."""
    tok = read_json_if_present(folder / "tokenizer.json")
    for added in tok.get("added_tokens", []):
        if added.get("content") == text:
            return int(added["id"])
    vocab = tok.get("model", {}).get("vocab", {})
    return int(vocab[text]) if isinstance(vocab, dict) and text in vocab else None


# transformers' Idefics3VisionConfig defaults (SigLIP), for keys a saved config leaves out.
SIGLIP_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6)
# HF vision towers' hidden_act names -> omnifuse's (nn/mlp.py ACTIVATIONS).
VISION_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def vision_activation(name: str, where: str) -> str:
    """omnifuse's name for a HF vision tower's ``hidden_act``; an unsupported one is named."""
    act = VISION_ACTIVATIONS.get(name)
    if act is None:
        raise CheckpointError(f"{where}: vision hidden_act {name!r} is not supported "
                              f"(supported: {sorted(VISION_ACTIVATIONS)})")
    return act


def siglip_vision_kwargs(vision: dict[str, Any], where: str) -> dict[str, Any]:
    """``VisionConfig`` fields of a SigLIP vision tower as Idefics3 and SmolVLM store it: no class
    token, no pre-norm, biased patch projection, the last layer's output through post_layernorm.
    Every crop the reference's processor makes is full size, where its bucketed position ids are the
    learned grid itself (tests/test_interop_siglip.py)."""
    v = {**SIGLIP_VISION_DEFAULTS, **vision}
    act = vision_activation(v["hidden_act"], where)
    return dict(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), hidden_size=int(v["hidden_size"]),
                num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
                intermediate_size=int(v["intermediate_size"]), num_channels=int(v["num_channels"]), use_cls=False,
                activation=act, norm_eps=float(v["layer_norm_eps"]), pre_norm=False, patch_bias=True, qkv_bias=True,
                feature_layer=-1, post_norm=True)


def siglip_vision_key_map(prefix: str) -> KeyMap:
    """A SigLIP vision tower's tensors (``{prefix}embeddings``, ``encoder.layers``, ``post_layernorm``)
    onto omnifuse's ``encoders.image.*``."""
    p = re.escape(prefix)
    return [
        (rf"{p}embeddings\.patch_embedding\.(weight|bias)", r"encoders.image.patch_embedding.\1"),
        (rf"{p}embeddings\.position_embedding\.weight", "encoders.image.position_embedding"),
        (rf"{p}embeddings\.position_ids", None),
        (rf"{p}encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"encoders.image.layers.\1.self_attn.o_proj.\2"),
        (rf"{p}encoder\.layers\.(\d+)\.(.+)", r"encoders.image.layers.\1.\2"),
        (rf"{p}post_layernorm\.(weight|bias)", r"encoders.image.post_layernorm.\1"),
    ]
