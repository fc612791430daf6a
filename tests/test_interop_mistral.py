"""Mistral (sliding-window attention) and Mixtral (softmax top-k mixture of experts) checkpoints
saved by transformers give the reference's logits and greedy tokens, prompts longer than the
window included; the sliding layers keep a ring cache of the window."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import generate_json, save_mistral

transformers = pytest.importorskip("transformers")

from omnifuse.inference import left_pad
from omnifuse.inference.batching import DecodeBatch
from omnifuse.inference.cache import RingKVCache
from omnifuse.pipeline import Pipeline

SHORT = "what colour is the circle"
LONG = "how many red square are left of the blue circle and in the picture is the green one above it"

CONFIGS = [
    dict(model_type="mistral", window=6),
    dict(model_type="mistral", window=3, heads=4, kv_heads=1, seed=1, layers=3),
    dict(model_type="mistral", window=None, seed=2, tie=True),
    dict(model_type="mixtral", window=5, experts=4, top_k=2, seed=3),
    dict(model_type="mixtral", window=None, experts=3, top_k=1, seed=4, head_dim=24),
    dict(model_type="mixtral", window=4, experts=6, top_k=3, seed=5, kv_heads=4),
]


def _ids(c):
    return "-".join(f"{k}{v}" for k, v in c.items())


def _reference(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_logits_match_the_reference_beyond_the_window(tmp_path, cfg):
    folder = save_mistral(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    window = cfg.get("window")
    kinds = {layer.self_attn.cache_span for layer in pipe.model.decoder.layers}
    assert kinds == ({None} if window is None else {pipe.model.decoder.layers[0].self_attn.cache_span})
    for prompt in (SHORT, LONG):
        ids = torch.tensor([pipe.prompt_ids(prompt)])
        assert window is None or prompt == SHORT or ids.shape[1] > 3 * window
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
            got = pipe.model(ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=prompt)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]], ids=_ids)
def test_a_left_padded_batch_matches_the_reference(tmp_path, cfg):
    folder = save_mistral(tmp_path, **cfg)
    ref = _reference(folder)
    pipe = Pipeline.from_checkpoint(folder)
    ids, mask = left_pad([pipe.prompt_ids(p) for p in (SHORT, LONG)], pad_id=0)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        got = pipe.model(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[3], CONFIGS[5]], ids=_ids)
def test_greedy_32_tokens_through_the_cli_equal_reference_generate(tmp_path, capsys, cfg):
    from transformers import AutoTokenizer

    folder = save_mistral(tmp_path, **cfg)
    ref = _reference(folder)
    ref_ids = AutoTokenizer.from_pretrained(folder)(LONG, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(input_ids=ref_ids, max_new_tokens=32, do_sample=False)
    expected = out[0, ref_ids.shape[1]:].tolist()
    assert len(expected) >= 16 and len(set(expected)) > 4  # a real sequence (or one that stops), past the window
    result = generate_json(capsys, "--checkpoint", folder, "--prompt", LONG, "--max-new-tokens", 32)
    assert result["tokens"] == expected
    # The batched paths give each row the tokens it gets alone: a left-padded batch ...
    pipe = Pipeline.from_checkpoint(folder)
    batch = pipe.generate_batch([SHORT, LONG], sampling=pipe.sampling(max_new_tokens=32))
    assert batch[1].tokens == expected
    # ... and a running batch the request joins after another has decoded for a while.
    running = DecodeBatch(pipe.model, max_rows=3, max_len=128, sampling=pipe.sampling(max_new_tokens=32))
    other = running.add(pipe.prompt_ids(SHORT))
    for _ in range(5):
        running.step()
    request = running.add(pipe.prompt_ids(LONG))
    while not request.done:
        running.step()
    assert request.tokens == expected and other.row != request.row


def test_sliding_layers_keep_a_ring_of_the_window_and_full_layers_the_context(tmp_path):
    folder = save_mistral(tmp_path / "sliding", window=6)
    model = Pipeline.from_checkpoint(folder).model
    cache = model.new_cache(2, 200)
    assert all(isinstance(layer, RingKVCache) and layer.capacity == 6 for layer in cache.self_attn.layers)
    assert cache.nbytes == model.new_cache(2, 400).nbytes  # constant in the context length
    full = Pipeline.from_checkpoint(save_mistral(tmp_path / "full", window=None)).model
    assert full.new_cache(2, 200).nbytes == cache.nbytes * 200 // 6
