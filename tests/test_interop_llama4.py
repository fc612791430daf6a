"""Llama 4 text checkpoints (``llama4_text``) saved by transformers give the reference's logits
and greedy tokens: chunked attention on the RoPE layers (prompts longer than the chunk), NoPE
layers with attention-temperature tuning, the weightless q/k norm, interleaved RoPE, sigmoid top-k
experts with a shared expert on every ``interleave_moe_layer_step``-th layer."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import edit_config, generate_json, save_llama4_text

transformers = pytest.importorskip("transformers")

from omnifuse.checkpoint import CheckpointError
from omnifuse.inference import left_pad
from omnifuse.inference.batching import DecodeBatch
from omnifuse.pipeline import Pipeline

SHORT = "what colour is the circle"
LONG = "how many red square are left of the blue circle and in the picture is the green one above it"

CONFIGS = [
    dict(chunk=5),
    dict(chunk=3, seed=1, heads=4, kv_heads=1, moe_step=1, experts=4, floor_scale=4),
    dict(chunk=4, seed=2, qk_norm=False, layers=6, nope_interval=3, top_k=2, floor_scale=6),
    dict(chunk=None, seed=3, moe_step=2, rope_scaling=True),
]


def _ids(c):
    return "-".join(f"{k}{v}" for k, v in c.items())


def _reference(folder):
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_logits_match_the_reference_beyond_the_chunk(tmp_path, cfg):
    folder = save_llama4_text(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    specs = pipe.model.config.layer_specs
    assert [s.rope for s in specs] == [bool(v) for v in ref.config.no_rope_layers]
    assert [s.feed_forward == "moe" for s in specs] == [i in ref.config.moe_layers for i in range(len(specs))]
    for prompt in (SHORT, LONG):
        ids = torch.tensor([pipe.prompt_ids(prompt)])
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
            got = pipe.model(ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=_ids)
def test_a_left_padded_batch_gives_each_row_the_reference_logits_alone(tmp_path, cfg):
    folder = save_llama4_text(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    prompts = [pipe.prompt_ids(p) for p in (SHORT, LONG)]
    ids, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        got = pipe.model(ids, mask)
        for row, prompt in enumerate(prompts):
            expected = ref(input_ids=torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(got[row, -len(prompt):], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[2]], ids=_ids)
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, cfg):
    from transformers import AutoTokenizer

    folder = save_llama4_text(tmp_path, **cfg)
    ref = _reference(folder)
    ref_ids = AutoTokenizer.from_pretrained(folder)(LONG, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, max_new_tokens=32, do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    assert len(expected) >= 16 and len(set(expected)) > 4
    result = generate_json(capsys, "--checkpoint", folder, "--prompt", LONG, "--max-new-tokens", 32)
    assert result["tokens"] == expected
    pipe = Pipeline.from_checkpoint(folder)
    batch = pipe.generate_batch([SHORT, LONG], sampling=pipe.sampling(max_new_tokens=32))
    assert batch[1].tokens == expected
    running = DecodeBatch(pipe.model, max_rows=2, max_len=128, sampling=pipe.sampling(max_new_tokens=32))
    running.add(pipe.prompt_ids(SHORT))
    for _ in range(3):
        running.step()
    request = running.add(pipe.prompt_ids(LONG))
    while not request.done:
        running.step()
    assert request.tokens == expected


def test_the_shipped_configs_quirks_load_and_bad_layer_lists_are_named(tmp_path):
    folder = save_llama4_text(tmp_path, seed=4)
    edit_config(folder, attn_temperature_tuning=4)  # Scout's config.json writes 4 for true
    assert Pipeline.from_checkpoint(folder).model.config.decoder.attn_temperature_floor == 8192
    edit_config(folder, moe_layers=[1, 9])
    with pytest.raises(CheckpointError, match=r"moe_layers \[1, 9\] name layers outside 0..3"):
        Pipeline.from_checkpoint(folder)
    edit_config(folder, moe_layers=[1, 3], layer_types=["chunked_attention"] * 3)
    with pytest.raises(CheckpointError, match="layer_types must give chunked_attention or full_attention"):
        Pipeline.from_checkpoint(folder)
