"""Model invariants: token counts, fusion identity at init, causal media visibility, loud mismatches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.fusion import FeatureCountError


def _text(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode,kwargs", [
    ("fixed", {"resize": "resize"}), ("fixed", {"resize": "pad"}), ("fixed", {"resize": "crop"}),
    ("dynamic", {"max_patches": 20}), ("tiles", {"max_tiles": 4, "overview": True}),
    ("tiles", {"max_tiles": 3, "overview": False}),
])
@pytest.mark.parametrize("feature_select", ["default", "full"])
def test_num_tokens_equals_features_the_model_produces(mode, kwargs, feature_select):
    model = make_model(tiny_config(mode=mode, feature_select=feature_select, **kwargs))
    proc = model.image_processor
    sizes = [(1, 1), (7, 90), (90, 7), (32, 32), (64, 33), (100, 20), (41, 97)]
    images = [proc(scene(w, h)) for w, h in sizes]
    feats = model.encode_media(images)
    for (w, h), img, f in zip(sizes, images, feats):
        assert f.shape == (proc.num_tokens(w, h), 64), (mode, w, h)
        assert img.num_tokens == proc.num_tokens(w, h)


def test_cross_attention_model_with_zero_gates_equals_its_text_decoder():
    cross = make_model(tiny_config("cross"))
    text_only = make_model(dataclasses.replace(tiny_config("early"), vision=None), seed=1)  # reads <image> as text
    # Copy the shared decoder (embeddings, self-attention layers, norm, head) into the text model.
    shared = {k: v for k, v in cross.state_dict().items() if not k.startswith(("decoder.cross_layers", "encoders", "connectors"))}
    text_only.load_state_dict(shared, strict=False)
    ids = torch.cat([_text(5), torch.tensor([[PLACEHOLDER]]), _text(7, 1)], dim=1)
    images = [[cross.image_processor(scene(50, 30))]]
    with torch.no_grad():
        fused = cross(ids, images=images)
        plain = text_only(ids)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_cross_attention_text_sees_only_preceding_images():
    model = make_model(tiny_config("cross"), gates=1.0)
    proc = model.image_processor
    a, b, c = proc(scene(40, 40, 1)), proc(scene(40, 40, 2)), proc(scene(30, 60, 3))
    ids = torch.cat([_text(4), torch.tensor([[PLACEHOLDER]]), _text(5, 1), torch.tensor([[PLACEHOLDER]]), _text(4, 2)], 1)
    first, second = 4, 10  # placeholder positions
    with torch.no_grad():
        ab = model(ids, images=[[a, b]])
        ac = model(ids, images=[[a, c]])
        cb = model(ids, images=[[c, b]])
        text = model(ids[:, :first])
    # Tokens before the first image see no image at all: identical to text alone.
    torch.testing.assert_close(ab[:, :first], text, atol=1e-5, rtol=1e-5)
    # Swapping the second image leaves everything before its placeholder unchanged ...
    torch.testing.assert_close(ab[:, :second], ac[:, :second], atol=1e-5, rtol=1e-5)
    # ... and changes what comes after it; swapping the first image changes the middle span.
    assert not torch.allclose(ab[:, second:], ac[:, second:], atol=1e-4)
    assert not torch.allclose(ab[:, first:second], cb[:, first:second], atol=1e-4)


def test_cross_attention_rows_without_images_work_in_a_mixed_batch():
    model = make_model(tiny_config("cross"), gates=0.7)
    img = model.image_processor(scene(64, 32))
    with_image = torch.cat([_text(3), torch.tensor([[PLACEHOLDER]]), _text(6, 1)], 1)  # (1, 10)
    no_image = _text(10, 2)
    with torch.no_grad():
        batch = model(torch.cat([with_image, no_image]), images=[[img], []])
        alone_img = model(with_image, images=[[img]])
        alone_txt = model(no_image)
    torch.testing.assert_close(batch[0:1], alone_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1:2], alone_txt, atol=1e-5, rtol=1e-5)


def test_early_fusion_splices_several_images_anywhere():
    model = make_model(tiny_config("early"))
    proc = model.image_processor
    a, b = proc(scene(40, 40, 1)), proc(scene(20, 50, 2))
    n = a.num_tokens
    ids = torch.cat([_text(3), torch.full((1, n), PLACEHOLDER), _text(4, 1), torch.full((1, n), PLACEHOLDER), _text(2, 2)], 1)
    feats = model.encode_media([a, b])
    with torch.no_grad():
        logits = model(ids, images=[[a, b]])
        swapped = model(ids, images=[[b, a]])
        # Manual splice: the embeddings at placeholder slots are exactly the image features.
        embeds = model.decoder.embed_tokens(ids).clone()
        embeds[0, 3:3 + n] = feats[0]
        embeds[0, 7 + n:7 + 2 * n] = feats[1]
    assert logits.shape == (1, ids.shape[1], 260)
    torch.testing.assert_close(logits[:, :3], swapped[:, :3])  # causal: text before images unchanged
    assert not torch.allclose(logits[:, 3:], swapped[:, 3:], atol=1e-4)
    from omnifuse.fusion import splice_features

    spliced = splice_features(model.decoder.embed_tokens(ids), ids == PLACEHOLDER, [feats])
    torch.testing.assert_close(spliced, embeds)


@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_placeholder_feature_mismatch_names_both_counts(fusion):
    model = make_model(tiny_config(fusion))
    img = model.image_processor(scene(32, 32))
    n = img.num_tokens if fusion == "early" else 1
    ids = torch.cat([_text(3), torch.full((1, n), PLACEHOLDER)], 1)
    with pytest.raises(FeatureCountError) as e:
        model(ids, images=[[img, img]])
    expected = (str(n), str(2 * img.num_tokens)) if fusion == "early" else ("1", "2")
    assert all(s in str(e.value) for s in expected), str(e.value)
    with pytest.raises(FeatureCountError, match="placeholder"):
        model(ids)  # placeholders but no images at all


def test_vision_encoder_interpolates_positions_for_other_grids():
    model = make_model(tiny_config(mode="dynamic", max_patches=64))
    ve = model.vision_encoder
    base = ve.positions(ve.grid, ve.grid)
    assert base.shape[0] == ve.grid * ve.grid + 1
    other = ve.positions(2, 7)
    assert other.shape == (2 * 7 + 1, base.shape[1])
    torch.testing.assert_close(other[0], base[0])  # CLS position is not interpolated


def test_feature_layer_selection_and_concatenation():
    from omnifuse.encoders import VisionTransformer

    torch.manual_seed(0)
    kw = dict(image_size=16, patch_size=8, dim=8, num_layers=3, num_heads=2, hidden=16)
    full = VisionTransformer(**kw, feature_layers=(-1,), drop_cls=False)
    pix = torch.randn(2, 3, 16, 16)
    for layers in [(-2,), (1,), (0, 2), (-1, -3)]:
        sub = VisionTransformer(**kw, feature_layers=layers, drop_cls=True)
        sub.load_state_dict(full.state_dict(), strict=False)
        out = sub(pix)
        assert out.shape == (2, 4, 8 * len(layers))
        # The first selected block of channels equals running the first k layers by hand.
        k = layers[0] % 4
        x = full.patch_embedding(pix).flatten(2).transpose(1, 2)
        x = torch.cat([full.class_embedding.expand(2, 1, -1), x], 1) + full.positions(2, 2)
        x = full.pre_layernorm(x)
        for layer in full.layers[:k]:
            x = layer(x)
        torch.testing.assert_close(out[..., :8], x[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion, mode", [("early", "fixed"), ("cross", "tiles")])
def test_connector_position_embedding_starts_at_zero_and_marks_each_crop_position(fusion, mode, replace):
    from omnifuse.config import ConnectorConfig

    base = tiny_config(fusion, mode=mode, **({"max_tiles": 4} if mode == "tiles" else {}))
    config = replace(base, connector=ConnectorConfig(type="mlp", position_embedding=True))
    plain, positioned = make_model(base), make_model(config)
    positioned.load_state_dict(plain.state_dict(), strict=False)  # same weights, positions at zero
    image = positioned.image_processor(scene(64, 32))
    assert torch.equal(plain.encode_media([image])[0], positioned.encode_media([image])[0])
    per_crop = config.tokens_per_crop
    assert positioned.connector.position_embedding.shape == (per_crop, config.decoder.hidden_size)
    with torch.no_grad():
        positioned.connector.position_embedding.copy_(torch.randn(per_crop, config.decoder.hidden_size))
    delta = positioned.encode_media([image])[0] - plain.encode_media([image])[0]
    crops = delta.reshape(-1, per_crop, delta.shape[-1])  # every crop (tile) gets the same positions
    assert torch.allclose(crops, positioned.connector.position_embedding.expand_as(crops), atol=1e-5)


def test_connector_position_embedding_needs_a_fixed_token_count(replace):
    from omnifuse.config import ConfigError, ConnectorConfig

    with pytest.raises(ConfigError, match="position_embedding"):
        replace(tiny_config("early", mode="dynamic", max_patches=16),
                connector=ConnectorConfig(type="mlp", position_embedding=True))
