"""Tiny random Hugging Face reference checkpoints, written to a temp folder (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = ["the", "a", "red", "blue", "green", "circle", "square", "left", "right", "above", "below", "of", "is", "what", "how", "many", "colour", "shape", "picture", "image", "describe", "count", "one", "two", "three", "yes", "no", "and", "in", "on", "to"]


def write_word_tokenizer(folder: Path, vocab_size: int, specials: dict[str, int], bos: str = "<s>",
                         eos: str = "</s>", chat_template: str | None = None, add_bos: bool = True,
                         newlines: bool = False) -> None:
    """A word-level tokenizer.json whose special tokens sit at the ids the model config expects.
    ``newlines``: "\\n" and "\\n\\n" are tokens (a run of newlines one piece, as a BPE merges it)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = dict(specials)
    free = (i for i in range(vocab_size) if i not in set(specials.values()))
    for w in WORDS + (["\n", "\n\n", ":", "User", "Assistant"] if newlines else []):
        vocab[w] = next(free)
    for i in free:  # fill the rest so every id decodes
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if newlines:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n+|:"), behavior="isolated")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in specials if t != "<unk>"])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials[bos])])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": eos, "unk_token": "<unk>", "add_bos_token": add_bos,
           "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def edit_config(folder: Path, **changes) -> None:
    """Change ``config.json`` keys in place: ``"section.key": value`` for a nested one; None removes it."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        target = data[section] if section else data
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    path.write_text(json.dumps(data))


def generate_json(capsys, *argv) -> dict:
    """``omnifuse generate ARGV --json`` in this process: its JSON, once it exited 0 without a warning."""
    from omnifuse.cli import main

    code = main(["generate", *(str(a) for a in argv), "--json"])
    captured = capsys.readouterr()
    assert code == 0 and "warning" not in captured.err.lower(), captured.err
    return json.loads(captured.out)


def randomise(model: torch.nn.Module, std: float = 0.08, seed: int = 0) -> None:
    """Spread the weights so greedy decoding has clear winners (no near-ties between two implementations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:  # BERT-style LayerNorm too
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "gate" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def save_llava(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, feature_layer=-2,
               strategy: str = "default", image_size: int = 28, patch: int = 14, vision_layers: int = 3,
               text_layers: int = 2, vocab: int = 320, image_token_id: int = 300, tie: bool = False,
               processor: str = "crop", mean=CLIP_MEAN, std=CLIP_STD, layout: str = "v5") -> Path:
    """``layout``: how the processor is saved. "v5": ``processor.save_pretrained`` of transformers 5
    (``processor_config.json`` with an ``image_processor`` section, the tokenizer re-saved);
    "v4": the image processor's own ``preprocessor_config.json``; "none": no processor files."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
                          image_size=image_size, patch_size=patch, projection_dim=16)
    tc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id},
                         chat_template="{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                                       "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    if processor == "pad":
        from transformers import LlavaImageProcessorPil as ImageProcessor
    else:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    image_processor = ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                     do_center_crop=processor == "crop", do_pad=processor == "pad",
                                     image_mean=list(mean), image_std=list(std))
    if layout == "v5":
        from transformers import AutoTokenizer, LlavaProcessor

        # num_additional_image_tokens=1: the CLS position CLIP adds, so "default" expands to the patch count.
        LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder),
                       patch_size=patch, vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                       image_token="<image>").save_pretrained(folder)
    elif layout == "v4":
        image_processor.save_pretrained(folder)
    return folder


def save_mllama(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, cross_layers=(1, 3),
                text_layers: int = 4, image_size: int = 28, max_tiles: int = 4, intermediate=(0, 2),
                vision_layers: int = 3, global_layers: int = 1, vocab: int = 320,
                rope_scaling: bool = False, mean=CLIP_MEAN, std=CLIP_STD, layout: str = "v5") -> Path:
    """``layout`` as in ``save_llava``."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    ratios = [[w, h] for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]
    vc = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                            num_global_layers=global_layers, attention_heads=2, image_size=image_size, patch_size=14,
                            max_num_tiles=max_tiles, intermediate_layers_indices=list(intermediate),
                            vision_output_dim=32 * (1 + len(intermediate)), supported_aspect_ratios=ratios)
    rope = ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if rope_scaling else None)
    tc_kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, cross_attention_layers=list(cross_layers),
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512)
    if rope:
        tc_kwargs["rope_parameters"] = rope
    tc = MllamaTextConfig(**tc_kwargs)
    cfg = MllamaConfig(vision_config=vc, text_config=tc, image_token_index=vocab)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab + 1, {"<unk>": 3, "<|begin_of_text|>": 1, "<|eot_id|>": 2, "<|finetune_right_pad_id|>": 0,
                                             "<|image|>": vocab},
                         bos="<|begin_of_text|>", eos="<|eot_id|>")
    from transformers import MllamaImageProcessorPil

    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=max_tiles,
                                              image_mean=list(mean), image_std=list(std))
    if layout == "v5":
        from transformers import AutoTokenizer, MllamaProcessor

        MllamaProcessor(image_processor=image_processor,
                        tokenizer=AutoTokenizer.from_pretrained(folder)).save_pretrained(folder)
    elif layout == "v4":
        image_processor.save_pretrained(folder)
    return folder


def save_llama(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, layers: int = 2, vocab: int = 320,
               tie: bool = False, head_dim: int | None = None, rope_scaling: bool = False, bias: bool = False) -> Path:
    """A tiny random ``LlamaForCausalLM`` with a word-level tokenizer, saved by ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if rope_scaling else None
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie, rms_norm_eps=1e-5, head_dim=head_dim,
                      attention_bias=bias, **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2},
                         chat_template="{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                                       "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return folder


def save_mistral(folder: Path, *, model_type: str = "mistral", seed: int = 0, heads: int = 4, kv_heads: int = 2,
                 layers: int = 2, vocab: int = 320, window: int | None = 6, experts: int = 4, top_k: int = 2,
                 head_dim: int | None = None, tie: bool = False) -> Path:
    """A tiny random ``MistralForCausalLM`` / ``MixtralForCausalLM`` (``model_type``) with a sliding
    window of ``window`` positions (None: full attention) and a word-level tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie, rms_norm_eps=1e-5, head_dim=head_dim,
                  sliding_window=window)
    if model_type == "mixtral":
        cfg, cls = MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k), MixtralForCausalLM
    else:
        cfg, cls = MistralConfig(**common), MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2})
    return folder


def _spread_llama4_experts(model: torch.nn.Module) -> None:
    """After ``randomise``: Llama 4's fused experts (named ``gate_up_proj``, which ``randomise``
    spreads like a gate) at the spread of the other weights, its routers decisive."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts.gate_up_proj" in name:
                p.mul_(0.08)
            elif "router" in name:
                p.mul_(1 / 0.08)


def save_llama4_text(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, layers: int = 4,
                     vocab: int = 320, chunk: int | None = 5, experts: int = 3, moe_step: int = 2, top_k: int = 1,
                     qk_norm: bool = True, floor_scale: int = 8192, nope_interval: int = 4,
                     rope_scaling: bool = False) -> Path:
    """A tiny random ``Llama4ForCausalLM``: chunked attention of ``chunk`` positions on RoPE layers,
    every ``nope_interval``-th layer NoPE (temperature tuning from ``floor_scale``), MoE every
    ``moe_step``-th layer, a word-level tokenizer."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64} if rope_scaling else None
    cfg = Llama4TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           head_dim=16, num_local_experts=experts, num_experts_per_tok=top_k,
                           interleave_moe_layer_step=moe_step, attention_chunk_size=chunk, use_qk_norm=qk_norm,
                           floor_scale=floor_scale, no_rope_layer_interval=nope_interval, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                           **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(cfg).eval()
    randomise(model, seed=seed)
    _spread_llama4_experts(model)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2})
    return folder


LLAMA4_SPECIALS = {"<|image_start|>": 300, "<|image_end|>": 301, "<|image|>": 302, "<|patch|>": 303,
                   "<|tile_x_separator|>": 304, "<|tile_y_separator|>": 305}


def save_llama4(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, layers: int = 4, vocab: int = 320,
                chunk: int | None = 5, experts: int = 3, moe_step: int = 2, tile: int = 56, patch: int = 14,
                vision_layers: int = 2, vision_hidden: int = 32, vision_heads: int = 2, max_tiles: int = 4,
                floor_scale: int = 8192) -> Path:
    """A tiny random ``Llama4ForConditionalGeneration`` (a ``tile`` px vision tower of
    ``vision_heads`` heads, pixel shuffle 0.5, the text model of ``save_llama4_text``), a
    word-level tokenizer with Llama 4's image tokens, and the image processor's settings as
    ``Llama4ImageProcessor`` saves them (it cannot be built here: it needs torchvision)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                num_local_experts=experts, interleave_moe_layer_step=moe_step, attention_chunk_size=chunk,
                floor_scale=floor_scale, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                rms_norm_eps=1e-5)
    vision = dict(hidden_size=vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                  intermediate_size=vision_hidden * 4, image_size=tile, patch_size=patch, pixel_shuffle_ratio=0.5,
                  projector_input_dim=48, projector_output_dim=48, vision_output_dim=48)
    cfg = Llama4Config(text_config=text, vision_config=vision, image_token_index=LLAMA4_SPECIALS["<|patch|>"],
                       boi_token_index=LLAMA4_SPECIALS["<|image_start|>"], eoi_token_index=LLAMA4_SPECIALS["<|image_end|>"])
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(cfg).eval()
    randomise(model, seed=seed)
    _spread_llama4_experts(model)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2, **LLAMA4_SPECIALS})
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessor", "size": {"height": tile, "width": tile},
        "max_patches": max_tiles, "resize_to_max_canvas": False, "resample": 2, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}))
    return folder


def save_qwen2_audio(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, mel_bins: int = 32,
                     chunk_seconds: int = 2, audio_layers: int = 2, text_layers: int = 2, vocab: int = 320,
                     audio_token_id: int = 300, layout: str = "v5") -> Path:
    """A tiny Qwen2-Audio checkpoint: Whisper encoder over ``chunk_seconds`` windows, Qwen2 decoder,
    its processor (WhisperFeatureExtractor + tokenizer) saved beside it."""
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config

    ac = Qwen2AudioEncoderConfig(num_mel_bins=mel_bins, encoder_layers=audio_layers, encoder_attention_heads=2,
                                 encoder_ffn_dim=64, d_model=32, max_source_positions=chunk_seconds * 50)
    tc = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                     rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2, tie_word_embeddings=False)
    cfg = Qwen2AudioConfig(audio_config=ac, text_config=tc, audio_token_index=audio_token_id)
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    positions = model.model.audio_tower.embed_positions.weight.detach().clone()  # Whisper's sinusoids
    randomise(model, seed=seed)
    with torch.no_grad():
        model.model.audio_tower.embed_positions.weight.copy_(positions)
    model.save_pretrained(folder)
    specials = {"<unk>": 0, "<|endoftext|>": 1, "<|im_end|>": 2, "<|audio_bos|>": 298, "<|audio_eos|>": 299,
                "<|AUDIO|>": audio_token_id}
    write_word_tokenizer(folder, vocab, specials, bos="<|endoftext|>", eos="<|im_end|>", add_bos=False,
                         chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    from transformers import WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=chunk_seconds)
    if layout == "v5":
        from transformers import AutoTokenizer, Qwen2AudioProcessor

        Qwen2AudioProcessor(feature_extractor=features, tokenizer=AutoTokenizer.from_pretrained(folder)).save_pretrained(folder)
    elif layout == "v4":
        features.save_pretrained(folder)
    return folder


def save_llava_next_video(folder: Path, *, seed: int = 0, heads: int = 4, kv_heads: int = 2, feature_layer=-2,
                          strategy: str = "default", image_size: int = 42, patch: int = 7, stride: int = 2,
                          vocab: int = 320, video_token_id: int = 301, image_token_id: int = 300) -> Path:
    """A tiny LLaVA-NeXT-Video checkpoint. Its video processor needs torchvision, which cannot run
    here, so its settings are written as ``processor.save_pretrained`` writes them (a
    ``video_processor`` section of CLIP resize + centre crop + normalise), and tests prepare the
    reference's frames with ``CLIPImageProcessorPil``, which does the same per frame."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=image_size, patch_size=patch, projection_dim=16)
    tc = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                     bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    cfg = LlavaNextVideoConfig(vision_config=vc, text_config=tc, video_token_index=video_token_id,
                               image_token_index=image_token_id, vision_feature_layer=feature_layer,
                               vision_feature_select_strategy=strategy, spatial_pool_stride=stride)
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id,
                                         "<video>": video_token_id})
    # The frame settings as transformers serialises them (CLIP's resize, crop and normalisation,
    # which is what the video processor does per frame), under the section its save writes.
    from transformers import CLIPImageProcessorPil

    frames = json.loads(CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}).to_json_string())
    frames.pop("image_processor_type")
    settings = {"video_processor": {**frames, "video_processor_type": "LlavaNextVideoVideoProcessor"},
                "processor_class": "LlavaNextVideoProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(settings, indent=2))
    return folder


IDEFICS3_TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
                     "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                     "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                     "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                     "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def save_idefics3(folder: Path, *, model_type: str = "smolvlm", seed: int = 0, heads: int = 4, kv_heads: int = 2,
                  image_size: int = 32, patch: int = 8, scale: int = 2, vision_layers: int = 2, text_layers: int = 2,
                  longest_edge: int = 96, vocab: int = 400, image_token_id: int = 300, tie: bool = False) -> Path:
    """An Idefics3 or SmolVLM checkpoint with its processor (``processor.save_pretrained``): tiles of
    ``image_size`` px, the longest side to ``longest_edge``, and a tokenizer holding the marker tokens."""
    import transformers

    prefix = {"smolvlm": "SmolVLM", "idefics3": "Idefics3"}[model_type]
    vision = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch)
    text = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
                                    rms_norm_eps=1e-5)
    cfg = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, scale_factor=scale,
                                                   image_token_id=image_token_id, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    specials = {"<unk>": 0, "<|im_start|>": 1, "<end_of_utterance>": 2, "<image>": image_token_id,
                "<fake_token_around_image>": image_token_id + 1, "<global-img>": image_token_id + 2}
    free = (i for i in range(image_token_id + 3, vocab))
    for r in range(1, 7):
        for c in range(1, 7):
            specials[f"<row_{r}_col_{c}>"] = next(free)
    write_word_tokenizer(folder, vocab, specials, bos="<|im_start|>", eos="<end_of_utterance>", add_bos=False,
                         chat_template=IDEFICS3_TEMPLATE, newlines=True)
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": image_size})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    seq_len = (image_size // patch) ** 2 // scale ** 2
    if model_type == "smolvlm":
        # The Hub layout of SmolVLM-256M-Instruct: preprocessor_config.json plus a processor_config.json
        # holding image_seq_len. (SmolVLMProcessor itself cannot be built here: its video processor
        # needs torchvision.)
        image_processor.save_pretrained(folder)
        (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": seq_len,
                                                                  "processor_class": "SmolVLMProcessor"}))
    else:  # transformers 5's processor.save_pretrained: everything in processor_config.json
        transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                       image_seq_len=seq_len).save_pretrained(folder)
    return folder


def write_wordpiece_tokenizer(folder: Path, vocab_size: int) -> None:
    """A BERT-style WordPiece tokenizer (lower-cased, ``[CLS] ... [SEP]``) saved as transformers'
    BertTokenizer saves one: InstructBLIP's Q-Former tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(w.lower() for w in WORDS), "?", ",", "."]
    vocab = {w: i for i, w in enumerate(words)}
    for i in range(len(vocab), vocab_size):
        vocab[f"q{i}"] = i
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.BertTokenizer(tokenizer_object=tok).save_pretrained(folder)


def save_blip2(folder: Path, *, model_type: str = "instructblip", seed: int = 0, heads: int = 4, kv_heads: int = 2,
               image_size: int = 28, patch: int = 7, queries: int = 6, qformer_layers: int = 3, cross_every: int = 2,
               vision_layers: int = 2, text_layers: int = 2, vocab: int = 300, image_token_id: int = 290,
               tie: bool = False) -> Path:
    """A BLIP-2 or InstructBLIP checkpoint with a Llama language model and its processor
    (``processor.save_pretrained``; InstructBLIP's Q-Former tokenizer in ``qformer_tokenizer/``)."""
    import transformers

    prefix = {"blip-2": "Blip2", "instructblip": "InstructBlip"}[model_type]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=image_size, patch_size=patch)
    qformer = dict(vocab_size=120, hidden_size=32, num_hidden_layers=qformer_layers, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=64, cross_attention_frequency=cross_every)
    text = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie).to_dict()
    cfg = getattr(transformers, f"{prefix}Config")(vision_config=vision, qformer_config=qformer, text_config=text,
                                                   num_query_tokens=queries, image_token_index=image_token_id)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg).eval()
    randomise(model, seed=seed)
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab, {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_token_id})
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    image_processor = transformers.BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    if model_type == "blip-2":
        processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                                num_query_tokens=queries)
    else:
        write_wordpiece_tokenizer(folder / "qformer_tokenizer", 120)
        qformer_tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "qformer_tokenizer")
        processor = transformers.InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                                       qformer_tokenizer=qformer_tokenizer, num_query_tokens=queries)
    processor.save_pretrained(folder)
    return folder


def save_idefics(folder: Path, *, seed: int = 0, heads: int = 4, layers: int = 4, interval: int = 2,
                 qk_norms: bool = False, image_size: int = 28, patch: int = 14, latents: int = 4,
                 perceiver_depth: int = 2, vocab: int = 300, additional: int = 2) -> Path:
    """An IDEFICS (v1) checkpoint and its processor (IdeficsProcessor with the PIL image processor).
    The tokenizer's ``<fake_token_around_image>`` and ``<image>`` are the extra vocabulary's first
    rows, as in the published checkpoints."""
    import transformers

    cfg = transformers.IdeficsConfig(
        vocab_size=vocab, additional_vocab_size=additional, hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=heads, cross_layer_interval=interval, qk_layer_norms=qk_norms,
        use_resampler=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512,
        vision_config=dict(embed_dim=32, image_size=image_size, patch_size=patch, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64),
        perceiver_config=dict(resampler_n_latents=latents, resampler_depth=perceiver_depth, resampler_n_heads=2,
                              resampler_head_dim=8))
    torch.manual_seed(seed)
    model = transformers.IdeficsForVisionText2Text(cfg).eval()
    randomise(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # open gates, so the images change the answer
        for name, p in model.named_parameters():
            if "alpha_" in name or ".ln." in name:
                p.copy_((1 if ".ln." in name else 0) + torch.randn(p.shape, generator=g) * (0.1 if ".ln." in name else 1))
    model.save_pretrained(folder)
    write_word_tokenizer(folder, vocab + additional, {"<unk>": 0, "<s>": 1, "</s>": 2,
                                                      "<fake_token_around_image>": vocab, "<image>": vocab + 1},
                         newlines=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = "<unk>"  # the processor always pads (to the longest prompt)
    transformers.IdeficsProcessor(image_processor=transformers.IdeficsImageProcessorPil(image_size=image_size),
                                  tokenizer=tokenizer).save_pretrained(folder)
    return folder
