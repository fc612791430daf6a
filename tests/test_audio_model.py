"""Audio through the model: the processor's token count is what the encoders give, both encoders,
both fusions, audio and images interleaved in one prompt, cached decoding and batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.config import AudioConfig, TextConfig
from omnifuse.errors import FeatureCountError
from omnifuse.inference import SamplingConfig, generate

AUDIO = 260  # the byte tokenizer's <audio>
RATE = 16000


def audio_config(fusion: str = "early", encoder: str = "whisper", vision: bool = True, **audio):
    base = tiny_config(fusion)
    settings = dict(encoder=encoder, chunk_seconds=1.0, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64, num_mel_bins=32, pool=2 if encoder == "whisper" else 1,
                    patch_mels=8, patch_frames=10)
    settings.update(audio)
    return dataclasses.replace(
        base, vision=base.vision if vision else None, audio=AudioConfig(**settings),
        decoder=dataclasses.replace(base.decoder, vocab_size=261),
        text=TextConfig(placeholder_tokens={"image": "<image>", "audio": "<audio>"}))


def clip(seconds: float, hz: float = 440.0, seed: int = 0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * hz * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32), RATE


@pytest.mark.parametrize("encoder", ["whisper", "patch"])
@pytest.mark.parametrize("seconds", [0.05, 0.5, 1.0, 2.37])
def test_the_token_count_is_what_the_encoder_gives(encoder, seconds):
    model = make_model(audio_config(encoder=encoder))
    proc = model.processors["audio"]
    item = proc(clip(seconds))
    assert item.num_tokens == proc.num_tokens(seconds) == proc.num_tokens_for_samples(round(seconds * RATE))
    assert item.inputs["input_features"].shape == (max(1, -(-round(seconds * RATE) // RATE)), 32, 100)
    (tokens,) = model.encode_media([item])
    assert tokens.shape == (item.num_tokens, 64)


def test_whisper_rates_and_padding_independence():
    model = make_model(audio_config(encoder="whisper"))
    proc = model.processors["audio"]
    assert proc.num_tokens(1.0) == 25  # 100 frames -> 50 after the stride-2 convolution -> 25 pooled
    assert proc.num_tokens(2.0) == 50
    # Padding is masked: what the padded frames of a chunk hold does not change the clip's tokens
    # (frames past the last audio frame + 2, beyond the convolutions' reach).
    a = proc(clip(0.4))
    frames = int(a.inputs["audio_frames"][0])
    noisy = a.inputs["input_features"].clone()
    noisy[..., frames + 2:] = torch.randn_like(noisy[..., frames + 2:])
    b = dataclasses.replace(a, inputs={**a.inputs, "input_features": noisy})
    with torch.no_grad():
        ta, tb = model.encode_media([a, b])
    assert a.num_tokens == 10
    torch.testing.assert_close(ta, tb, atol=1e-6, rtol=1e-6)


def test_the_patch_encoder_counts_mel_bands_per_time_step():
    proc = make_model(audio_config(encoder="patch")).processors["audio"]
    assert proc.num_tokens(1.0) == 10 * 4  # 100 frames / 10 per patch, 32 mel bins / 8 per patch
    assert proc.num_tokens(0.101) == 2 * 4  # 11 frames hold audio: two time steps


def _prompt(model, items, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4,), generator=g).tolist()
    for item in items:
        token = AUDIO if item.modality == "audio" else PLACEHOLDER
        ids += [token] * model.fusion.placeholder_tokens(item.num_tokens)
        ids += torch.randint(0, 256, (3,), generator=g).tolist()
    return ids


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_audio_and_images_interleave_and_cached_decoding_matches_recompute(fusion):
    model = make_model(audio_config(fusion), gates=0.5)
    items = [model.processors["audio"](clip(0.6, 300)), model.image_processor(scene(40, 30)),
             model.processors["audio"](clip(1.3, 900, seed=1))]
    prompt = _prompt(model, items, 0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        full = model(ids, images=[items])
        swapped = model(ids, images=[[items[2], items[1], items[0]]]) if fusion == "cross" else None
        cache = model.new_cache(1, len(prompt) + 4)
        first = model(ids, images=[items], cache=cache)
        nxt = torch.tensor([[int(first[0, -1].argmax())]])
        step = model(nxt, cache=cache)
        again = model(torch.cat([ids, nxt], 1), images=[items])
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, -1], again[0, -1], atol=1e-4, rtol=1e-4)
    if swapped is not None:  # the items are read in prompt order: another order is another input
        assert not torch.allclose(swapped, full, atol=1e-4)


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_a_mixed_batch_gives_each_row_its_tokens_alone(fusion):
    model = make_model(audio_config(fusion), gates=0.5)
    audio = model.processors["audio"]
    rows = [[], [audio(clip(0.8, 500))], [model.image_processor(scene(30, 50))],
            [audio(clip(0.3, 700, seed=2)), model.image_processor(scene(50, 30, 1))]]
    prompts = [_prompt(model, items, i) for i, items in enumerate(rows)]
    cfg = SamplingConfig(max_new_tokens=12, stop_token_ids=())
    with torch.no_grad():
        batched = generate(model, prompts, rows, cfg)
        alone = [generate(model, [p], [r], cfg)[0] for p, r in zip(prompts, rows)]
    assert batched == alone


def test_an_audio_placeholder_without_a_clip_is_named():
    model = make_model(audio_config("early"))
    item = model.processors["audio"](clip(0.5))
    ids = torch.tensor([[5] + [AUDIO] * (item.num_tokens + 1)])
    with pytest.raises(FeatureCountError, match=f"{item.num_tokens + 1} image/audio placeholder tokens"):
        model(ids, images=[[item]])


def test_an_audio_only_model_and_its_byte_vocabulary():
    config = dataclasses.replace(audio_config(vision=False),
                                 text=TextConfig(placeholder_tokens={"audio": "<audio>"}))
    model = make_model(config)
    assert config.modalities == ("audio",) and model.placeholder_ids == {"audio": 260}
    from omnifuse.processing.text import ByteTokenizer

    tok = ByteTokenizer(config.text)
    assert tok.vocab_size == 261 and tok.encode("a<audio>b<image>", add_bos=False)[:3] == [97, 260, 98]
    assert tok.encode("<image>", add_bos=False) == list(b"<image>")  # not a placeholder of this model
