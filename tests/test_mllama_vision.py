"""Llama 3.2 Vision encoder: parity with transformers' MllamaVisionModel on tiny random models."""

from __future__ import annotations

import pytest
import torch

from omnifuse.encoders.mllama_vision import (
    MllamaVisionEncoder,
    aspect_ratio_attention_mask,
    mllama_vision_kwargs,
    pack_tiles,
    supported_aspect_ratios,
)

transformers = pytest.importorskip("transformers")
from transformers import MllamaVisionConfig, MllamaVisionModel

# Tokens per tile are 5, 10 and 17, so the pad to a multiple of 8 is 3, 6 and 7: every value a square
# patch grid can give ((g^2 + 1) % 8 is 1, 2 or 5, never 0).
CONFIGS = {
    "4tiles-pad3": dict(image_size=28, num_hidden_layers=3, num_global_layers=2, attention_heads=4,
                        intermediate_layers_indices=[0, 2], max_num_tiles=4),
    "2tiles-pad6": dict(image_size=42, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                        intermediate_layers_indices=[1], max_num_tiles=2, hidden_act="quick_gelu"),
    "1tile-pad7": dict(image_size=56, num_hidden_layers=4, num_global_layers=1, attention_heads=4,
                       intermediate_layers_indices=[-1, 0, 2], max_num_tiles=1, norm_eps=1e-6),
}


def hf_config(**overrides) -> MllamaVisionConfig:
    kw = dict(patch_size=14, hidden_size=32, intermediate_size=64) | overrides
    layers = kw.get("intermediate_layers_indices", [3, 7, 15, 23, 30])
    kw.setdefault("vision_output_dim", kw["hidden_size"] * (1 + len(layers)))
    kw.setdefault("supported_aspect_ratios", [list(r) for r in supported_aspect_ratios(kw.get("max_num_tiles", 4))])
    return MllamaVisionConfig(**kw)


def randomized_hf_model(config: MllamaVisionConfig, seed: int = 0) -> MllamaVisionModel:
    """HF inits gates to ~0 and embeddings small; randomize everything so every path matters."""
    torch.manual_seed(seed)
    model = MllamaVisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(-1.5, 1.5)  # tanh(gate) well away from 0 and 1
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.1)
    return model


def ours_from(model: MllamaVisionModel) -> MllamaVisionEncoder:
    encoder = MllamaVisionEncoder(**mllama_vision_kwargs(model.config.to_dict())).eval()
    encoder.load_state_dict(model.state_dict(), strict=True)
    return encoder


def images(config: MllamaVisionConfig, ratio_ids: list[int], seed: int = 1):
    """One row per image: random real tiles (as many as the aspect ratio's grid), zero padding tiles.

    Id 0 is a padding image, which the HF processor gives a mask of [1, 0, ...].
    """
    g = torch.Generator().manual_seed(seed)
    grids = supported_aspect_ratios(config.max_num_tiles)
    rows = []
    for rid in ratio_ids:
        n = 1 if rid == 0 else grids[rid - 1][0] * grids[rid - 1][1]
        tiles = torch.randn(n, config.num_channels, config.image_size, config.image_size, generator=g)
        rows.append(pack_tiles(tiles * (rid != 0), config.max_num_tiles))
    pixel_values = torch.stack([r[0] for r in rows])  # (N, T, C, S, S)
    mask = torch.stack([r[1] for r in rows])  # (N, T)
    return pixel_values, torch.tensor(ratio_ids), mask


def hf_forward(model, pixel_values, ratio_ids, mask) -> torch.Tensor:
    # HF takes (B, num_images, T, C, S, S); ours flattens (B, num_images). Use B=1 and N images.
    out = model(pixel_values=pixel_values[None], aspect_ratio_ids=ratio_ids[None],
                aspect_ratio_mask=mask[None]).last_hidden_state  # (1, N, T, L, output_dim)
    return out[0]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_transformers(name, attn):
    config = hf_config(**CONFIGS[name])
    model = randomized_hf_model(config)
    model.set_attn_implementation(attn)
    ours = ours_from(model)
    num_ratios = len(config.supported_aspect_ratios)
    # Every aspect ratio (1 real tile up to all tiles real) plus a padding image, in one batch.
    batch = images(config, list(range(1, num_ratios + 1)) + [0])
    with torch.no_grad():
        expected, got = hf_forward(model, *batch), ours(*batch)
    assert got.shape == (len(batch[1]), config.max_num_tiles, ours.tokens_per_tile, config.vision_output_dim)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_two_images_with_different_tile_counts():
    config = hf_config(**CONFIGS["4tiles-pad3"])
    model = randomized_hf_model(config, seed=3)
    ours = ours_from(model)
    batch = images(config, [1, 6], seed=4)  # (1, 1): one real tile; (2, 2): all four
    assert batch[2].sum(1).tolist() == [1, 4]
    with torch.no_grad():
        got = ours(*batch)
        torch.testing.assert_close(got, hf_forward(model, *batch), atol=1e-5, rtol=0)
        # Images do not interact: each alone gives the same features.
        for i in range(2):
            alone = ours(*(t[i:i + 1] for t in batch))
            torch.testing.assert_close(alone[0], got[i], atol=1e-5, rtol=0)


def test_parameter_names_equal_hf_state_dict():
    for overrides in CONFIGS.values():
        model = MllamaVisionModel(hf_config(**overrides))
        ours = MllamaVisionEncoder(**mllama_vision_kwargs(model.config.to_dict()))
        assert list(ours.state_dict()) and set(ours.state_dict()) == set(model.state_dict())
        for key, value in model.state_dict().items():
            assert ours.state_dict()[key].shape == value.shape, key


def test_checkpoint_prefix_strips_to_our_names():
    model = randomized_hf_model(hf_config(**CONFIGS["2tiles-pad6"]))
    checkpoint = {f"model.vision_model.{k}": v for k, v in model.state_dict().items()}
    ours = MllamaVisionEncoder(**mllama_vision_kwargs(model.config.to_dict()))
    prefix = "model.vision_model."
    ours.load_state_dict({k.removeprefix(prefix): v for k, v in checkpoint.items() if k.startswith(prefix)})
    assert torch.equal(ours.global_transformer.layers[0].gate_attn, model.global_transformer.layers[0].gate_attn)


def test_attention_mask_blocks_only_padding_pairs():
    # 2 tiles of 5 tokens padded to 8; tile 1 is padding.
    mask = aspect_ratio_attention_mask(torch.tensor([[1, 0]]), tokens_per_tile=5, num_padding=3,
                                       dtype=torch.float32)
    assert mask.shape == (1, 1, 16, 16)
    padding = torch.tensor([0] * 5 + [1] * 3 + [1] * 8, dtype=torch.bool)
    blocked = mask[0, 0] == torch.finfo(torch.float32).min
    assert torch.equal(blocked, padding[:, None] & padding[None, :])
    assert not blocked[:5].any()  # real queries see every key, padding included


def test_padding_tiles_reach_real_tokens_as_in_hf():
    # The HF mask lets real tokens attend to padding tiles, so padding-tile pixels change real outputs.
    config = hf_config(**CONFIGS["2tiles-pad6"])
    model = randomized_hf_model(config)
    ours = ours_from(model)
    pixel_values, ids, mask = images(config, [1])
    other = pixel_values.clone()
    other[:, 1] = 1.0  # padding tile no longer zero
    with torch.no_grad():
        changed = ours(other, ids, mask)[:, 0] - ours(pixel_values, ids, mask)[:, 0]
        torch.testing.assert_close(ours(other, ids, mask), hf_forward(model, other, ids, mask), atol=1e-5, rtol=0)
    assert changed.abs().max() > 1e-3


def test_pack_tiles():
    tiles = torch.randn(2, 3, 28, 28)
    pixel_values, mask = pack_tiles(tiles, 4)
    assert pixel_values.shape == (4, 3, 28, 28) and mask.tolist() == [1, 1, 0, 0]
    assert torch.equal(pixel_values[:2], tiles) and not pixel_values[2:].any()
    with pytest.raises(ValueError, match="1 to 4 tiles, got 5"):
        pack_tiles(torch.randn(5, 3, 28, 28), 4)


def test_kwargs_from_hf_config():
    kw = mllama_vision_kwargs(MllamaVisionConfig().to_dict())  # the 11B / 90B encoder
    assert kw == dict(image_size=448, patch_size=14, dim=1280, num_layers=32, num_global_layers=8, num_heads=16,
                      hidden=5120, intermediate_layers=(3, 7, 15, 23, 30), max_num_tiles=4, num_channels=3,
                      eps=1e-5, activation="gelu", num_aspect_ratios=8)
    assert kw["dim"] * (1 + len(kw["intermediate_layers"])) == MllamaVisionConfig().vision_output_dim
    assert mllama_vision_kwargs({})["intermediate_layers"] == (3, 7, 15, 23, 30)  # config.json may omit keys

    small = mllama_vision_kwargs(hf_config(**CONFIGS["1tile-pad7"]).to_dict())
    assert small["intermediate_layers"] == (-1, 0, 2) and small["num_aspect_ratios"] == 1
    assert small["eps"] == 1e-6 and small["max_num_tiles"] == 1
    ours = MllamaVisionEncoder(**small)
    assert ours.output_dim == 128 and ours.tokens_per_tile == 17 and ours.intermediate_layers == (3, 0, 2)


def test_kwargs_reject_unsupported_options():
    with pytest.raises(ValueError, match="hidden_act='swish'"):
        mllama_vision_kwargs(hf_config(hidden_act="swish").to_dict())
    with pytest.raises(ValueError, match="max_num_tiles=2"):
        mllama_vision_kwargs({"max_num_tiles": 2})
    with pytest.raises(ValueError, match="image_size"):
        mllama_vision_kwargs({"image_size": [448, 448]})


def test_wrong_input_shapes_fail_loudly():
    ours = MllamaVisionEncoder(**mllama_vision_kwargs(hf_config(**CONFIGS["4tiles-pad3"]).to_dict()))
    with pytest.raises(ValueError, match=r"\(N, 4, C, 28, 28\)"):
        ours(torch.zeros(1, 3, 3, 28, 28), torch.tensor([1]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        ours(torch.zeros(2, 4, 3, 28, 28), torch.tensor([1]), torch.ones(2, 4))
