"""Compressing connectors (Q-Former, perceiver, pixel shuffle, pooling) and token merging: each
item's ``num_tokens`` is exactly what the encoder and connector produce, over many image sizes
and every image mode they take; they run in both fusions; the pixel-shuffle order is the
reference's; bad combinations are refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PLACEHOLDER, make_model, scene, tiny_config

from omnifuse.config import ConfigError, ConnectorConfig, ImageConfig, VisionConfig
from omnifuse.connectors.spatial import pixel_shuffle
from omnifuse.encoders.tome import Merge, merged_tokens
from omnifuse.encoders.vit import ViTLayer

SIZES = [(32, 32), (20, 20), (64, 64), (100, 40), (30, 90), (7, 300), (500, 500), (1200, 300)]
CONNECTORS = {
    "mlp": ConnectorConfig(type="mlp"),
    "qformer": ConnectorConfig(type="qformer", tokens=6, num_layers=3, num_heads=2),
    "perceiver": ConnectorConfig(type="perceiver", tokens=5, num_layers=2, num_heads=2, hidden_size=16),
    "pixel_shuffle": ConnectorConfig(type="pixel_shuffle", scale_factor=2),
    "pixel_shuffle_mlp": ConnectorConfig(type="pixel_shuffle", scale_factor=4, projection="mlp"),
    "pool": ConnectorConfig(type="pool", tokens=4),
}
GRID_FREE = ("mlp", "qformer", "perceiver")  # take any feature layout: dynamic crops, merged tokens


def _config(connector: str, mode: str = "fixed", fusion: str = "early", merge: int = 0, feature_select="default",
            **image):
    base = tiny_config(fusion, mode=mode, feature_select=feature_select, **image)
    vision = dataclasses.replace(base.vision, merge_tokens=merge, num_layers=3, feature_layer=-2)
    return dataclasses.replace(base, vision=vision, connector=CONNECTORS[connector])


def _assert_counts_hold(model, sizes=SIZES):
    for w, h in sizes:
        item = model.image_processor(scene(w, h, seed=w + h))
        produced = model.encode_media([item])[0]
        assert produced.shape == (item.num_tokens, model.config.decoder.hidden_size), (w, h)
        assert item.num_tokens == model.image_processor.num_tokens(w, h)


@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("mode", ["fixed", "tiles", "dynamic"])
def test_num_tokens_is_what_each_connector_produces(connector, mode):
    if mode == "dynamic" and connector not in GRID_FREE:
        with pytest.raises(ConfigError, match="needs a fixed patch grid"):
            _config(connector, mode)
        return
    kwargs = {"max_tiles": 4, "overview": True} if mode == "tiles" else {}
    if mode == "dynamic":
        kwargs = {"min_patches": 4, "max_patches": 40}
    model = make_model(_config(connector, mode, **kwargs))
    _assert_counts_hold(model)


@pytest.mark.parametrize("connector", GRID_FREE)
@pytest.mark.parametrize("merge", [1, 3, 100])
@pytest.mark.parametrize("feature_select", ["default", "full"])
def test_token_merging_keeps_num_tokens_exact(connector, merge, feature_select):
    model = make_model(_config(connector, "tiles", merge=merge, feature_select=feature_select, max_tiles=4))
    _assert_counts_hold(model)
    if connector == "mlp":  # fewer tokens than the 16 patches (+ class token) of a crop
        grid = 16 + (feature_select == "full")
        assert model.config.tokens_per_crop == merged_tokens(17, merge, 2, protected=1) - 1 + (feature_select == "full")
        assert model.config.tokens_per_crop < grid


def test_fixed_count_connectors_ignore_the_image_size():
    for name, tokens in (("qformer", 6), ("perceiver", 5)):
        model = make_model(_config(name, "dynamic", min_patches=4, max_patches=40))
        assert {model.image_processor.num_tokens(w, h) for w, h in SIZES} == {tokens}


@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("fusion", ["early", "cross"])
def test_every_connector_runs_in_both_fusions(connector, fusion):
    model = make_model(_config(connector, fusion=fusion), gates=0.5)
    image = model.image_processor(scene(40, 30))
    n = image.num_tokens
    ids = torch.tensor([[5, 6] + [PLACEHOLDER] * model.fusion.placeholder_tokens(n) + [7, 8]])
    with torch.no_grad():
        logits = model(ids, images=[[image]])
    assert logits.shape == (1, ids.shape[1], 260) and torch.isfinite(logits).all()
    other = model.image_processor(scene(40, 30, seed=9))
    with torch.no_grad():
        assert not torch.allclose(model(ids, images=[[other]])[0, -1], logits[0, -1])  # the image is read


def test_connector_parameters_learn():
    """Every compressing connector's parameters get gradients (none left unused)."""
    for name in ("qformer", "perceiver", "pixel_shuffle", "pool"):
        model = make_model(_config(name)).train()
        image = model.image_processor(scene(40, 30))
        ids = torch.tensor([[5] + [PLACEHOLDER] * image.num_tokens + [7, 8]])
        model(ids, images=[[image]]).logsumexp(-1).sum().backward()
        missing = [k for k, p in model.connectors.named_parameters() if p.grad is None or not p.grad.abs().sum()]
        assert not missing, (name, missing)


@pytest.mark.parametrize(("rows", "cols", "s"), [(4, 4, 2), (8, 8, 2), (8, 8, 4), (6, 6, 3)])
def test_pixel_shuffle_order_is_idefics3s(rows, cols, s):
    idefics3 = pytest.importorskip("transformers.models.idefics3.modeling_idefics3")
    x = torch.randn(2, rows * cols, 5)
    reference = idefics3.Idefics3Connector.pixel_shuffle(None, x, s)
    assert torch.equal(pixel_shuffle(x, rows, cols, s), reference)


def test_pixel_shuffle_on_a_wide_grid_keeps_blocks_together():
    """Each output token holds one s x s block of neighbouring patches (rows x cols need not be square)."""
    rows, cols, s = 2, 6, 2
    ids = torch.arange(rows * cols, dtype=torch.float32).view(1, rows * cols, 1)
    out = pixel_shuffle(ids, rows, cols, s)[0]  # (3, 4)
    assert out.tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


# --- token merging ---------------------------------------------------------------------------

def test_merging_r0_is_the_plain_encoder():
    plain = make_model(_config("mlp"))
    merged_config = _config("mlp", merge=1)
    merging = make_model(merged_config)
    merging.load_state_dict(plain.state_dict())
    merging.encoders["image"].merge_tokens = 0  # the same weights with r = 0: every output equal
    image = plain.image_processor(scene(40, 30))
    assert torch.allclose(merging.media_features([image])[0], plain.media_features([image])[0], atol=1e-6)


def test_merging_duplicate_tokens_leaves_the_next_layer_unchanged():
    """Proportional attention: a token that stands for two identical patches (size 2) weighs as
    much in attention as the two did, so merging exact duplicates changes nothing downstream."""
    torch.manual_seed(0)
    layer = ViTLayer(16, 2, 32, "gelu", 1e-5, True).eval()
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    half = torch.randn(1, 5, 16)
    x = half.repeat_interleave(2, dim=1)  # tokens 2i and 2i + 1 equal: each A token's match is its twin
    with torch.no_grad():
        plain = layer(layer(x))
        merged, size, _ = layer.forward_merging(x, torch.ones(1, 10, 1), r=5, protected=0)
        assert merged.shape == (1, 5, 16) and size.flatten().tolist() == [2.0] * 5
        merged, _, no_merge = layer.forward_merging(merged, size, r=0, protected=0)
    assert no_merge is None
    assert torch.allclose(merged, plain[:, 1::2], atol=1e-5)


def test_merge_is_a_size_weighted_average_and_protects_the_class_token():
    torch.manual_seed(1)
    x = torch.randn(3, 9, 4)
    metric = x.clone()
    metric[:, 2] = metric[:, 1] * 2  # token 2 (in A) matches token 1 (in B) exactly in direction
    size = torch.rand(3, 9, 1) + 0.5
    merge = Merge(metric, r=1, protected=1)
    out, new_size = merge.weighted(x, size)
    assert out.shape == (3, 8, 4)
    assert torch.allclose(new_size.sum(1), size.sum(1))  # every patch is still counted once
    assert torch.allclose(out[:, 0], x[:, 0], atol=1e-6)  # the class token stays first, unmerged
    # token 2 merged into token 1, which keeps its place; every other token is itself, in order
    expected = (x[:, 1] * size[:, 1] + x[:, 2] * size[:, 2]) / (size[:, 1] + size[:, 2])
    assert torch.allclose(out[:, 1], expected, atol=1e-6)
    assert torch.allclose(out[:, 2:], x[:, 3:], atol=1e-6)
    assert torch.equal(merge.src[:, 0], torch.ones(3, dtype=torch.long))  # A index 1 = token 2


def test_merged_token_counts():
    assert merged_tokens(65, 8, 2, protected=1) == 49
    assert merged_tokens(10, 100, 1) == 5  # at most half of the tokens per layer
    assert merged_tokens(17, 100, 3, protected=1) == 3  # 17 -> 9 -> 5 -> 3
    assert merged_tokens(50, 0, 12) == 50


# --- refused combinations ---------------------------------------------------------------------

def test_bad_connector_settings_are_refused_by_name():
    base = tiny_config("early")
    with pytest.raises(ConfigError, match="scale_factor 3 does not divide the patch grid 4 x 4"):
        dataclasses.replace(base, connector=ConnectorConfig(type="pixel_shuffle", scale_factor=3))
    with pytest.raises(ConfigError, match="square num_tokens, got 6"):
        dataclasses.replace(base, connector=ConnectorConfig(type="pool", tokens=6))
    with pytest.raises(ConfigError, match="at least that large"):
        dataclasses.replace(base, connector=ConnectorConfig(type="pool", tokens=25))
    with pytest.raises(ConfigError, match="pixel_shuffle needs patch features on a grid"):
        dataclasses.replace(base, vision=dataclasses.replace(base.vision, merge_tokens=2),
                            connector=ConnectorConfig(type="pixel_shuffle"))
    with pytest.raises(ConfigError, match="pixel_shuffle needs patch features on a grid"):
        dataclasses.replace(base, vision=dataclasses.replace(base.vision, feature_select="full"),
                            connector=ConnectorConfig(type="pixel_shuffle"))
    with pytest.raises(ConfigError, match="connector.projection must be linear, mlp, llama4 or none"):
        ConnectorConfig(type="pool", projection="conv")
    with pytest.raises(ConfigError, match="projection none .* is a perceiver setting, not pool's"):
        ConnectorConfig(type="pool", projection="none")
    with pytest.raises(ConfigError, match="connector.head_dim is a perceiver setting, not qformer's"):
        ConnectorConfig(type="qformer", head_dim=8)
    perceiver = ConnectorConfig(type="perceiver", projection="none")
    with pytest.raises(ConfigError, match="projection none .* needs cross fusion"):
        dataclasses.replace(base, connector=perceiver)
    cross = tiny_config("cross")
    narrow = dataclasses.replace(cross, connector=dataclasses.replace(perceiver, hidden_size=24, num_heads=2, head_dim=5))
    assert narrow.media_width == 24  # the cross-attention layers project the latents from their own width
    model = make_model(narrow)
    assert {layer.cross_attn.k_proj.in_features for layer in model.cross_layers.values()} == {24}
    assert model.connectors["image"](torch.randn(2, 16, 32)).shape == (2, 64, 24)  # 64 latents
    with pytest.raises(ConfigError, match="not divisible by connector.num_heads 5"):
        dataclasses.replace(base, connector=ConnectorConfig(type="qformer", num_heads=5))
    with pytest.raises(ConfigError, match="merge_tokens needs a single feature_layer"):
        VisionConfig(feature_layer=(-1, -2), merge_tokens=2)
    with pytest.raises(ConfigError, match="merge_tokens needs vision.type vit"):
        VisionConfig(type="mllama", use_cls=True, feature_select="full", merge_tokens=2)


def test_audio_takes_only_token_preserving_connectors():
    from omnifuse.config import AudioConfig

    with pytest.raises(ConfigError, match=r"audio.connector 'qformer' unknown; known: \['linear', 'mlp'\]"):
        AudioConfig(connector="qformer")


def test_video_frames_go_through_a_compressing_connector():
    from omnifuse.presets import get_preset

    base = get_preset("tiny-omni-early")
    config = dataclasses.replace(base, connector=ConnectorConfig(type="qformer", tokens=8, num_heads=4),
                                 image=ImageConfig(mode="fixed", image_size=64, resize="pad"))
    model = make_model(config)
    frames = [scene(64, 64, seed=i) for i in range(3)]
    clip = model.processors["video"]((frames, 1.0))
    assert clip.num_tokens == 3 * 8
    assert model.encode_media([clip])[0].shape[0] == clip.num_tokens


def test_generate_merge_tokens_reports_fewer_image_tokens(tmp_path, capsys):
    import json

    from omnifuse.cli import main

    path = tmp_path / "a.png"
    scene(120, 80).save(path)
    counts = []
    for extra in ([], ["--merge-tokens", "8"]):
        assert main(["generate", "--preset", "tiny-early", "--image", str(path), "--prompt", "hi",
                     "--max-new-tokens", "3", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        counts.append((out["images"][0]["tokens"], out["prompt_tokens"]))
    assert counts[0][0] == 64 and counts[1][0] == 48  # 65 -> 57 -> 49 tokens over 2 layers, class token dropped
    assert counts[0][1] - counts[1][1] == 16  # the prompt is shorter by as many


def test_merge_tokens_is_refused_where_the_connector_needs_the_grid(tmp_path, capsys):
    from omnifuse.cli import main

    path = tmp_path / "a.png"
    scene(120, 80).save(path)
    assert main(["generate", "--preset", "tiny-idefics3", "--image", str(path), "--prompt", "hi",
                 "--merge-tokens", "8"]) == 1
    assert "pixel_shuffle needs patch features on a grid" in capsys.readouterr().err


def test_token_merging_switches_on_and_off_on_a_trained_model():
    """What the arena's `from` strategies do: the same weights, merging on, then off again."""
    model = make_model(_config("mlp"))
    image_source = scene(40, 30)
    before = model.encode_media([model.image_processor(image_source)])[0]
    model.set_token_merging(3)
    merged = model.image_processor(image_source)
    assert merged.num_tokens == model.config.tokens_per_crop == 16 - 3 - 3 < 16
    assert model.encode_media([merged])[0].shape[0] == merged.num_tokens
    model.set_token_merging(0)
    assert model.config == _config("mlp")
    assert torch.equal(model.encode_media([model.image_processor(image_source)])[0], before)
    pixel_shuffle_model = make_model(_config("pixel_shuffle"))
    with pytest.raises(ConfigError, match="pixel_shuffle needs patch features on a grid"):
        pixel_shuffle_model.set_token_merging(2)
    assert pixel_shuffle_model.config.vision.merge_tokens == 0  # refused: the model is left as it was


def test_sources_say_which_patches_each_merged_token_holds():
    model = make_model(_config("mlp", merge=3))
    encoder = model.encoders["image"]
    pixels = model.image_processor(scene(40, 30)).pixel_values
    with torch.no_grad():
        out, source = encoder(pixels, sources=True)
        assert torch.equal(out, encoder(pixels))
    # class token first on both sides; every input token in exactly one output; sizes add up
    assert source.shape == (1, 11, 17) and torch.equal(source.sum(1), torch.ones(1, 17))
    assert source[0, 0, 0] == 1 and source[0, 0, 1:].sum() == 0


@pytest.mark.parametrize("preset", ["tiny-blip2", "tiny-flamingo", "tiny-idefics3", "tiny-pool", "tiny-tome"])
def test_omnifuse_train_runs_each_connector(tmp_path, preset):
    """Swapping a connector is a config edit: the trainer takes each one and its loss falls."""
    import json

    from omnifuse.cli import main

    assert main(["train", f"model={preset}", "steps=8", "batch_size=4", "train_size=64", "val_size=8", "lr=0.003",
                 "warmup_steps=0", "skills=[colour]", f"out_dir={tmp_path}", "eval_every=0"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 2 and losses[-1] < losses[0]
