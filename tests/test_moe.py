"""Mixture-of-experts feed-forward (nn/moe.py): both routers against a token-by-token reference,
only the routed experts run, the shared expert, the load-balancing and z losses, and a decoder
with MoE on every other layer (also int8 and packed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_model, tiny_config

from omnifuse.config import ConfigError, DecoderConfig, LayerSpec
from omnifuse.nn.moe import MoE


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, every expert's weight computed as the papers write it."""
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = moe.router(token)
        if moe.router_kind == "softmax":
            probs = logits.softmax(-1)
            w, idx = probs.topk(moe.top_k)
            y = sum(wi / w.sum() * moe.experts[int(i)](token) for wi, i in zip(w, idx))
        else:
            w, idx = logits.topk(moe.top_k)
            y = sum(moe.experts[int(i)](token * torch.sigmoid(wi)) for wi, i in zip(w, idx))
        if moe.shared_expert is not None:
            y = y + moe.shared_expert(token)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("router, top_k, shared", [("softmax", 2, 0), ("sigmoid", 1, 48), ("softmax", 1, 32)])
def test_the_routed_sum_equals_a_token_by_token_reference(router, top_k, shared):
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, top_k=top_k, router=router, shared_hidden=shared).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.allclose(moe(x), _reference(moe, x), atol=1e-5)
        one = x[:1, :1]  # a single token (decoding at batch 1) takes a path of its own
        assert torch.allclose(moe(one), _reference(moe, one), atol=1e-5)


def test_only_the_experts_a_batch_routes_to_run():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=6, top_k=1).eval()
    with torch.no_grad():  # a router that sends every token to expert 1 or 4 (by the sign of its first feature)
        moe.router.weight.zero_()
        moe.router.weight[1, 0], moe.router.weight[4, 0] = 5.0, -5.0
    ran = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda _m, inputs, _o, e=e: ran.append((e, inputs[0].shape[0])))
    x = torch.randn(20, 8)
    with torch.no_grad():
        moe(x)
    positive = int((x[:, 0] > 0).sum())
    assert sorted(ran) == sorted([(1, positive), (4, 20 - positive)])  # each once, on its own tokens only


def test_the_losses_reward_balance_and_reach_the_router():
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, top_k=2).train()
    with torch.no_grad():  # every token's probability and slots on experts 0 and 1
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = 5.0
    x = torch.randn(64, 8)
    x[:, 0] = 2.0
    moe(x)
    skewed = float(moe.aux_loss.detach())
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.01)
    x = torch.randn(4096, 8)
    moe(x)
    assert abs(float(moe.aux_loss.detach()) - 1.0) < 0.05  # balanced routing: the loss's minimum, 1
    assert skewed > 1.9  # every token on the same two experts: twice the balanced loss
    moe.router.weight.grad = None
    (moe.aux_loss + moe.z_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def _moe_config(**decoder):
    config = tiny_config("early")
    pattern = (LayerSpec(), LayerSpec(feed_forward="moe"))  # MoE on every other layer
    d = dataclasses.replace(config.decoder, **{"layer_pattern": pattern, "num_experts": 4, "experts_per_token": 2,
                                               "expert_intermediate_size": 64,
                                               "shared_expert_intermediate_size": 32, **decoder})
    return dataclasses.replace(config, decoder=d)


def test_a_moe_config_round_trips():
    from omnifuse.config import ModelConfig, config_from_dict, config_to_dict

    config = _moe_config(router="sigmoid", experts_per_token=1)
    assert config_from_dict(ModelConfig, config_to_dict(config)) == config


def test_a_decoder_with_moe_on_every_other_layer_runs_quantised_and_packed():
    from omnifuse.inference import SamplingConfig, generate
    from omnifuse.inference.quantize import quantize_int8
    from omnifuse.nn.packed import pack_linears

    model = make_model(_moe_config())
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["SwiGLU", "MoE", "SwiGLU"]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)
        packed = make_model(_moe_config())
        pack_linears(packed)
        assert torch.allclose(packed(ids), reference, atol=1e-4)
        int8 = quantize_int8(make_model(_moe_config()))
        assert (int8(ids) - reference).abs().max() < 0.1 * reference.abs().max()
    tokens = generate(model, ids.tolist(), None, SamplingConfig(max_new_tokens=6))
    assert [len(t) for t in tokens] == [6, 6]


@pytest.mark.parametrize("changes, words", [
    ({"num_experts": 0}, "num_experts must be positive"),
    ({"experts_per_token": 5}, "experts_per_token must be in 1..4"),
    ({"router": "argmax"}, "router 'argmax' unknown"),
])
def test_bad_moe_settings_are_named(changes, words):
    base = dict(layer_pattern=(LayerSpec(feed_forward="moe"),), num_experts=4, experts_per_token=1)
    with pytest.raises(ConfigError, match=words):
        DecoderConfig(vocab_size=260, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                      **{**base, **changes})


def test_training_a_moe_model_adds_the_router_losses_and_logs_them(tmp_path):
    """The load-balancing and z losses reach the objective (the router learns otherwise with them
    than without) and are logged per step; a model without MoE layers logs none."""
    import json

    from omnifuse.training.config import TrainConfig
    from omnifuse.training.loop import Trainer

    base = dict(model="tiny-moe", train_size=40, val_size=4, batch_size=4, steps=2, warmup_steps=0, lr=3e-3,
                max_length=128, skills=("colour",), image_size=64)
    routers = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"c{coef}"
        trainer = Trainer(TrainConfig(**base, router_aux_loss_coef=coef, router_z_loss_coef=coef, out_dir=str(out)),
                          quiet=True)
        trainer.run()
        routers[coef] = [m.router.weight.detach().clone() for m in trainer.moe_layers]
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:2]
        assert all(s["router_aux_loss"] > 0 and s["router_z_loss"] > 0 for s in steps)
    assert len(routers[0.0]) == 2 and not any(torch.allclose(a, b) for a, b in zip(routers[0.0], routers[1.0]))
    dense = Trainer(TrainConfig(**{**base, "model": "tiny-early", "steps": 1}, out_dir=str(tmp_path / "d")), quiet=True)
    dense.run()
    assert "router_aux_loss" not in (tmp_path / "d" / "metrics.jsonl").read_text()
