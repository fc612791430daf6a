"""oneDNN packing and int8 weights: same model, same answers, checkpoints unaffected."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, scene, tiny_config

from omnifuse.inference import SamplingConfig, generate
from omnifuse.inference.quantize import Int8Linear, quantize_int8
from omnifuse.nn.packed import PackedLinear, can_pack, pack_linears

needs_onednn = pytest.mark.skipif(not can_pack(), reason="oneDNN is not available in this torch build")


@needs_onednn
@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_packed_model_gives_the_same_logits_and_tokens(fusion):
    model = make_model(tiny_config(fusion), gates=0.5)
    packed = copy.deepcopy(model)
    assert pack_linears(packed) > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    img = model.image_processor(scene(50, 40))
    n = img.num_tokens if fusion == "early" else 1
    ids = torch.cat([torch.arange(3, 10)[None], torch.full((1, n), 259), torch.arange(20, 25)[None]], 1)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids, images=[[img]]), model(ids, images=[[img]]), atol=1e-5, rtol=1e-5)
    prompts = [ids[0].tolist()]
    cfg = SamplingConfig(max_new_tokens=16)
    assert generate(packed, prompts, [[img]], cfg) == generate(model, prompts, [[img]], cfg)


@needs_onednn
def test_packed_model_saves_and_loads_dense_weights(tmp_path):
    from omnifuse.checkpoint import load_checkpoint, save_checkpoint

    model = make_model(tiny_config("early"))
    packed = copy.deepcopy(model)
    pack_linears(packed)
    assert set(packed.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(packed.state_dict()[k], v), k  # the reorder is exactly undone
    save_checkpoint(packed, tmp_path)
    loaded = load_checkpoint(tmp_path)
    ids = torch.arange(5, 30)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    layer = PackedLinear(torch.nn.Linear(8, 4))
    layer.load_state_dict({"weight": torch.ones(4, 8), "bias": torch.zeros(4)})
    torch.testing.assert_close(layer(torch.ones(1, 8)), torch.full((1, 4), 8.0))


def test_int8_linear_is_close_to_float32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear(linear)
    x = torch.randn(3, 5, 64)
    ref = linear(x)
    err = (q(x) - ref).abs().max() / ref.abs().max()
    assert q(x).shape == (3, 5, 48)
    assert err < 0.02  # int8 weights and per-token int8 activations: ~1% of the output range
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.numel() == 64 * 48


def _teacher_forced_agreement(model, prompt: list[int], reference: list[int]) -> float:
    """Share of steps where ``model`` picks the reference's next token, fed the reference so far."""
    cache = model.new_cache(1, len(prompt) + len(reference))
    agree = 0
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
        for tok in reference:
            agree += int(logits.argmax()) == tok
            logits = model(torch.tensor([[tok]]), cache=cache, last_only=True)[0, -1]
    return agree / len(reference)


def test_int8_model_decodes_like_float32_on_a_confident_model():
    # Random weights give flat next-token distributions whose top two logits sit within rounding of
    # each other; a few steps of training on a repeating text give the peaked ones of a real model.
    model = make_model(tiny_config("early", init_std=0.02))
    text = torch.tensor([list(b"the red circle is left of the blue square. " * 2)[:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits = model(text[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], text[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    quantized = quantize_int8(copy.deepcopy(model))
    assert any(isinstance(m, Int8Linear) for m in quantized.modules())
    assert type(quantized.vision_encoder.layers[0].mlp.fc1) is torch.nn.Linear  # the encoder stays float32
    prompt = list(b"the red circle")
    reference = generate(model, [prompt], cfg=SamplingConfig(max_new_tokens=64))[0]
    assert _teacher_forced_agreement(quantized, prompt, reference) >= 0.95


def test_cli_quantize_int8_runs(capsys):
    import json

    from omnifuse.cli import main

    assert main(["generate", "--preset", "tiny-early", "--prompt", "hello", "--max-new-tokens", "5",
                 "--quantize", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) <= 5
