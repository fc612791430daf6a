"""Qwen2-Audio checkpoints saved by transformers load in omnifuse and give the reference's logits
and tokens. Inputs for the reference come from its own processor (``Qwen2AudioProcessor``:
WhisperFeatureExtractor + the saved tokenizer); clips are synthesised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_fixtures import save_qwen2_audio

transformers = pytest.importorskip("transformers")

from omnifuse.cli import main
from omnifuse.pipeline import Pipeline

RATE = 16000
PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|> what is this"


def clip(seconds: float, hz: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.4 * np.sin(2 * np.pi * hz * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def reference(folder):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(folder)


def ref_inputs(processor, prompt, clips):
    kwargs = {"audio": clips, "sampling_rate": RATE} if clips else {}
    return processor(text=prompt, return_tensors="pt", **kwargs)


CONFIGS = [
    dict(heads=4, kv_heads=2, mel_bins=32, chunk_seconds=2),
    dict(heads=4, kv_heads=4, mel_bins=80, chunk_seconds=1, seed=1),
    dict(heads=2, kv_heads=1, mel_bins=128, chunk_seconds=3, seed=2, audio_layers=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"h{c['heads']}kv{c['kv_heads']}-mel{c['mel_bins']}-{c['chunk_seconds']}s")
def test_logits_match_reference(tmp_path, cfg):
    folder = save_qwen2_audio(tmp_path, **cfg)
    ref, processor = reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    window = cfg["chunk_seconds"]
    a, b = clip(0.73 * window, 440.0, 1), clip(window, 700.0, 2)  # part of a window, a whole one
    cases = [("what is this", []), (PROMPT, [a]),
             ("<|audio_bos|><|AUDIO|><|audio_eos|> and <|audio_bos|><|AUDIO|><|audio_eos|> same", [a, b])]
    for prompt, clips in cases:
        want = ref_inputs(processor, prompt, clips)
        ids, items = pipe.prompt_and_media(prompt, {"audio": pipe.process("audio", [(c, RATE) for c in clips])})
        assert ids == want["input_ids"][0].tolist(), prompt  # the same audio token counts and layout
        for item, features in zip(items, want.get("input_features", [])):
            torch.testing.assert_close(item.inputs["input_features"][0], features, atol=1e-4, rtol=0)
        extra = {k: want[k] for k in ("input_features", "feature_attention_mask") if k in want}
        with torch.no_grad():
            expected = ref(input_ids=want["input_ids"], attention_mask=want["attention_mask"], **extra).logits
            got = pipe.model(torch.tensor([ids]), images=[items] if items else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_left_padded_batch_matches_reference(tmp_path):
    folder = save_qwen2_audio(tmp_path, seed=4)
    ref, processor = reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    x = clip(1.3, 520.0, 3)
    (item,) = pipe.process("audio", [(x, RATE)])
    rows = [pipe.prompt_and_media(PROMPT, {"audio": [item]})[0], pipe.prompt_ids("how many tones are there", [])]
    from omnifuse.inference import left_pad

    ids, mask = left_pad(rows, pad_id=1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    want = ref_inputs(processor, PROMPT, [x])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       input_features=want["input_features"], feature_attention_mask=want["feature_attention_mask"]).logits
        got = pipe.model(ids, mask, images=[[item], []])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, layout):
    folder = save_qwen2_audio(tmp_path / "ckpt", seed=5, layout=layout)
    ref, _ = reference(folder)
    from transformers import WhisperFeatureExtractor

    x = clip(1.55, 610.0, 6)
    wav = tmp_path / "clip.wav"
    import soundfile as sf

    sf.write(wav, x, RATE, subtype="FLOAT")  # float samples: the file holds exactly x
    features = WhisperFeatureExtractor.from_pretrained(folder)(x, sampling_rate=RATE, return_tensors="pt",
                                                                return_attention_mask=True)
    assert main(["generate", "--checkpoint", str(folder), "--audio", str(wav), "--prompt", PROMPT,
                 "--max-new-tokens", "32", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    tokens = ours["audio"][0]["tokens"]
    assert tokens == ((155 - 1) // 2 + 1 - 2) // 2 + 1  # 155 frames -> 78 -> 39, Qwen2-Audio's lengths
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(PROMPT.replace("<|AUDIO|>", "<|AUDIO|>" * tokens),
                                                return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=features["input_features"],
                           feature_attention_mask=features["attention_mask"], max_new_tokens=32, do_sample=False)
    expected = out[0, ids.shape[1]:].tolist()
    assert ours["tokens"] == expected
    assert len(expected) >= 8


def test_a_feature_extractor_that_does_not_fit_the_encoder_is_named(tmp_path):
    folder = save_qwen2_audio(tmp_path, chunk_seconds=2)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["feature_extractor"]["feature_size"] = 80
    (folder / "processor_config.json").write_text(json.dumps(settings))
    from omnifuse.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="feature_size 80 but the encoder takes 32 mel bins"):
        Pipeline.from_checkpoint(folder)


def test_a_folder_without_feature_extractor_settings_says_which_defaults(tmp_path):
    from omnifuse.config import LoudDefaultWarning

    folder = save_qwen2_audio(tmp_path, chunk_seconds=30, layout="none")
    with pytest.warns(LoudDefaultWarning, match="WhisperFeatureExtractor's defaults"):
        pipe = Pipeline.from_checkpoint(folder)
    assert pipe.model.config.audio.chunk_seconds == 30 and pipe.model.config.audio.num_mel_bins == 32
