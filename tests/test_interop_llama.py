"""Plain Llama text checkpoints saved by transformers run through omnifuse's text decoder with the
reference's logits and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scene
from hf_fixtures import save_llama

transformers = pytest.importorskip("transformers")

from omnifuse.fusion import FeatureCountError
from omnifuse.pipeline import Pipeline

PROMPTS = ["what colour is the circle", "how many red square are left of the blue circle and in the picture"]

CONFIGS = [
    dict(heads=4, kv_heads=2),
    dict(heads=4, kv_heads=4, seed=1, tie=True),
    dict(heads=4, kv_heads=1, seed=2, head_dim=24, layers=3),
    dict(heads=2, kv_heads=2, seed=3, rope_scaling=True, bias=True),
]


def _reference(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_logits_match_reference_model_and_decoder_alone(tmp_path, cfg):
    folder = save_llama(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    assert pipe.model.vision_encoder is None and pipe.model.config.vision is None
    for prompt in PROMPTS:
        ids = torch.tensor([pipe.prompt_ids(prompt)])
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
            got = pipe.model(ids)
            alone = pipe.model.decoder(ids)  # the decoder module by itself
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)
        torch.testing.assert_close(alone, expected, atol=1e-4, rtol=1e-4, msg=prompt)


def test_left_padded_batch_matches_reference(tmp_path):
    folder = save_llama(tmp_path, seed=4)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    from omnifuse.inference import left_pad

    ids, mask = left_pad([pipe.prompt_ids(p) for p in PROMPTS], pad_id=0)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = pipe.model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [dict(seed=5), dict(seed=6, heads=4, kv_heads=1, rope_scaling=True)])
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, cfg):
    from transformers import AutoTokenizer

    from omnifuse.cli import main

    folder = save_llama(tmp_path, **cfg)
    ref = _reference(folder)
    prompt = PROMPTS[1]
    ref_ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, max_new_tokens=32, do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    assert main(["generate", "--checkpoint", str(folder), "--prompt", prompt, "--max-new-tokens", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == expected[:len(result["tokens"])] and len(result["tokens"]) == len(expected)
    assert len(expected) >= 8  # a real sequence, not an immediate stop
    # The batched, KV-cached path gives each row the tokens it gets alone.
    pipe = Pipeline.from_checkpoint(folder)
    batch = pipe.generate_batch([PROMPTS[0], prompt], sampling=pipe.sampling(max_new_tokens=32))
    assert batch[1].tokens == expected


def test_a_text_model_refuses_images_by_name(tmp_path):
    folder = save_llama(tmp_path, seed=7)
    pipe = Pipeline.from_checkpoint(folder)
    with pytest.raises(FeatureCountError, match="text-only model; it takes no images"):
        pipe.generate("describe <image>", [scene(32, 32)])
    # "<image>" in a text model's prompt is plain text, not a placeholder.
    assert pipe.prompt_ids("<image>") == pipe.tokenizer.encode("<image>")
