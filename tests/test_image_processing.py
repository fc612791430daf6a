"""Image loading and processing: token counts match pixels, and pixels match Hugging Face."""

from __future__ import annotations

import importlib
import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from omnifuse.config import ConfigError, ImageConfig
from omnifuse.processing import image as image_mod
from omnifuse.processing import resample
from omnifuse.processing.image import (
    ImageError,
    ImageProcessor,
    ProcessedImage,
    aspect_ratio_id,
    load_image,
)

# (width, height): square, thin both ways, tiny, odd, photo-sized, huge.
SIZES = [(1, 1), (7, 300), (300, 7), (224, 224), (1000, 10), (10, 1000), (333, 777), (1920, 1080),
         (4000, 3000), (1, 5000), (5000, 1), (13, 13), (29, 57)]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def hf_mllama():
    """Hugging Face's PIL-based Mllama processor module (transformers 5: *_pil_*; 4.x: the only one)."""
    pytest.importorskip("transformers")
    for name, cls in (("image_processing_pil_mllama", "MllamaImageProcessorPil"),
                      ("image_processing_mllama", "MllamaImageProcessor")):
        try:
            mod = importlib.import_module(f"transformers.models.mllama.{name}")
            return mod, getattr(mod, cls)
        except (ImportError, AttributeError):
            continue
    pytest.skip("no PIL-based MllamaImageProcessor in this transformers")


def hf_clip():
    pytest.importorskip("transformers")
    for name, cls in (("image_processing_pil_clip", "CLIPImageProcessorPil"),
                      ("image_processing_clip", "CLIPImageProcessor")):
        try:
            return getattr(importlib.import_module(f"transformers.models.clip.{name}"), cls)
        except (ImportError, AttributeError):
            continue
    pytest.skip("no PIL-based CLIPImageProcessor in this transformers")


# Small image sizes keep every mode fast even for 4000 x 3000 inputs.
CONFIGS = [
    ImageConfig(mode="fixed", image_size=28, resize="resize"),
    ImageConfig(mode="fixed", image_size=28, resize="pad"),
    ImageConfig(mode="fixed", image_size=28, resize="crop"),
    ImageConfig(mode="dynamic", max_patches=16, min_patches=1),
    ImageConfig(mode="dynamic", max_patches=64, min_patches=9),
    ImageConfig(mode="tiles", image_size=28, max_tiles=4, overview=True),
    ImageConfig(mode="tiles", image_size=28, max_tiles=2, overview=False),
    ImageConfig(mode="tiles", image_size=28, max_tiles=1, overview=True),
]


# ---------------------------------------------------------------------------------------------
# Token counts agree with the pixels


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.resize}-{c.max_patches}-{c.max_tiles}")
@pytest.mark.parametrize("cls_tokens", [0, 1])
def test_num_tokens_matches_pixels(cfg, cls_tokens):
    p = 14
    proc = ImageProcessor(cfg, patch_size=p, cls_tokens=cls_tokens)
    for w, h in SIZES:
        out = proc(Image.new("RGB", (w, h), (90, 140, 200)))  # cheap even when huge
        n_crops, _, ch, cw = out.pixel_values.shape
        gh, gw = out.grid
        assert out.pixel_values.dtype == torch.float32
        assert (ch, cw) == (gh * p, gw * p), (w, h)
        assert out.num_tokens == proc.num_tokens(w, h) == n_crops * (gh * gw + cls_tokens), (w, h)
        assert out.original_size == (w, h)
        rows, cols = out.tiles
        if cfg.mode == "tiles":
            assert (rows, cols) == proc.canvas(w, h)
            assert n_crops == rows * cols + int(cfg.overview)
            assert rows * cols <= cfg.max_tiles
            assert out.grid == (cfg.image_size // p,) * 2
        else:
            assert (rows, cols) == (1, 1) == proc.canvas(w, h) and n_crops == 1
        if cfg.mode == "fixed":
            assert proc.target_size(w, h) == (cfg.image_size, cfg.image_size)
        if cfg.mode == "dynamic":
            assert proc.target_size(w, h) == (cw, ch)


def test_fixed_mode_token_count_is_grid_squared():
    proc = ImageProcessor(ImageConfig(mode="fixed", image_size=224), patch_size=14, cls_tokens=1)
    assert proc.num_tokens(640, 480) == 16 * 16 + 1


def test_num_tokens_rejects_bad_sizes():
    proc = ImageProcessor(ImageConfig(), patch_size=14)
    for w, h in [(0, 10), (10, -1), (2.5, 3)]:
        with pytest.raises(ImageError, match="positive integers"):
            proc.num_tokens(w, h)


def test_processor_rejects_mismatched_patch_size():
    with pytest.raises(ConfigError, match="image_size 224 is not a multiple of patch_size 15"):
        ImageProcessor(ImageConfig(mode="fixed", image_size=224), patch_size=15)
    with pytest.raises(ConfigError, match="not a multiple"):
        ImageProcessor(ImageConfig(mode="tiles", image_size=224), patch_size=15)
    ImageProcessor(ImageConfig(mode="dynamic", image_size=224), patch_size=15)  # size unused there


# ---------------------------------------------------------------------------------------------
# Dynamic resolution


def test_dynamic_patch_budget_and_aspect():
    rng = random.Random(0)
    for max_patches, min_patches in [(1, 1), (16, 1), (64, 9), (256, 4), (1024, 256)]:
        proc = ImageProcessor(ImageConfig(mode="dynamic", max_patches=max_patches, min_patches=min_patches),
                              patch_size=14)
        sizes = SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(300)]
        for w, h in sizes:
            tw, th = proc.target_size(w, h)
            assert tw % 14 == 0 and th % 14 == 0
            rows, cols = th // 14, tw // 14
            assert 1 <= rows * cols <= max_patches, (w, h, rows, cols)
            if min(rows, cols) >= 6:  # one patch of rounding per side is the only distortion
                assert abs(math.log((cols / rows) / (w / h))) < math.log(1.5), (w, h, rows, cols)


def test_dynamic_follows_smart_resize():
    proc = ImageProcessor(ImageConfig(mode="dynamic", max_patches=256, min_patches=4), patch_size=14)
    assert proc.target_size(224, 224) == (224, 224)  # exactly 16 x 16 patches
    assert proc.target_size(448, 448) == (224, 224)  # 4x over budget: halve both sides
    assert proc.target_size(150, 100) == (154, 98)  # nearest patch: 10.7 -> 11 cols, 7.1 -> 7 rows
    assert proc.target_size(300, 200) == (266, 182)  # 21 x 14 is over budget: scale by 1.09, floor
    assert proc.target_size(1, 1) == (28, 28)  # grown to min_patches
    assert proc.target_size(1, 5000) == (14, 256 * 14)  # one patch wide, budget along the length
    assert proc.target_size(5000, 1) == (256 * 14, 14)


# ---------------------------------------------------------------------------------------------
# Tiles: canvas choice and pixels agree with Hugging Face Mllama


def test_tiles_canvas_matches_mllama():
    mod, _ = hf_mllama()
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(200)]
    sizes += [(448, 224), (224, 448), (560, 560), (224, 672), (100, 448)]  # exact fits and ties
    for max_tiles in (1, 2, 4, 6):
        for tile in (28, 224, 560):
            cfg = ImageConfig(mode="tiles", image_size=tile, max_tiles=max_tiles)
            proc = ImageProcessor(cfg, patch_size=14)
            for w, h in sizes:
                ch, cw = mod.get_optimal_tiled_canvas(h, w, max_tiles, tile)
                assert proc.canvas(w, h) == (ch // tile, cw // tile), (w, h, max_tiles, tile)
                nh, nw = mod.get_image_size_fit_to_canvas(h, w, ch, cw, tile)
                assert proc.target_size(w, h) == (nw, nh), (w, h, max_tiles, tile)


def test_aspect_ratio_id_matches_mllama():
    mod, _ = hf_mllama()
    for max_tiles in (1, 2, 4, 8):
        supported = mod.get_all_supported_aspect_ratios(max_tiles)
        for i, (rows, cols) in enumerate(supported):
            assert aspect_ratio_id(rows, cols, max_tiles) == i + 1
    with pytest.raises(ImageError, match="3 x 2"):
        aspect_ratio_id(3, 2, 4)


@pytest.mark.parametrize("max_tiles", [1, 2, 4])
def test_tiles_pixels_match_mllama(max_tiles):
    _, Mllama = hf_mllama()
    s = 28
    hf = Mllama(size={"height": s, "width": s}, max_image_tiles=max_tiles)
    cfg = ImageConfig(mode="tiles", image_size=s, max_tiles=max_tiles, overview=False,
                      mean=tuple(hf.image_mean), std=tuple(hf.image_std))
    proc = ImageProcessor(cfg, patch_size=14)
    sizes = [(20, 20), (28, 28), (60, 30), (30, 61), (100, 17), (9, 120), (45, 45), (140, 140)]
    for i, (w, h) in enumerate(sizes):
        img = random_image(w, h, seed=i)
        ref = hf(images=[[img]], return_tensors="np")
        out = proc(img)
        n = int(np.asarray(ref["num_tiles"]).reshape(-1)[0])
        rows, cols = out.tiles
        assert n == rows * cols == out.pixel_values.shape[0]
        assert int(ref["aspect_ratio_ids"][0, 0]) == aspect_ratio_id(rows, cols, max_tiles)
        np.testing.assert_allclose(out.pixel_values.numpy(), ref["pixel_values"][0, 0, :n], atol=1e-4, rtol=0)


def test_tiles_overview_is_whole_image_and_padding_is_black():
    s = 28
    cfg = ImageConfig(mode="tiles", image_size=s, max_tiles=4, overview=True)
    proc = ImageProcessor(cfg, patch_size=14)
    img = random_image(50, 20, seed=3)  # fits a 1 x 2 canvas: 56 x 22, so the bottom is padding
    out = proc(img)
    assert out.tiles == (1, 2) and out.pixel_values.shape == (3, 3, s, s)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    _, th = proc.target_size(50, 20)
    black = (0 - mean) / std  # Mllama pads before normalising
    torch.testing.assert_close(out.pixel_values[0, :, th:, :], black.expand(3, s - th, s))
    overview = torch.from_numpy(np.asarray(img.resize((s, s), Image.BICUBIC)).copy()).permute(2, 0, 1)
    torch.testing.assert_close(out.pixel_values[2], (overview.float() / 255 - mean) / std)


# ---------------------------------------------------------------------------------------------
# Fixed mode


@pytest.mark.parametrize("s", [32, 56])
def test_crop_mode_matches_clip(s):
    Clip = hf_clip()
    hf = Clip(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    cfg = ImageConfig(mode="fixed", resize="crop", image_size=s,
                      mean=tuple(hf.image_mean), std=tuple(hf.image_std))
    proc = ImageProcessor(cfg, patch_size=8)
    for i, (w, h) in enumerate([(s, s), (40, 90), (90, 41), (7, 120), (13, 13), (200, 150)]):
        img = random_image(w, h, seed=i)
        ref = hf(images=img, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(proc(img).pixel_values[0].numpy(), ref, atol=1e-4, rtol=0)


def test_crop_mode_thin_image_shortcut_is_close(monkeypatch):
    cfg = ImageConfig(mode="fixed", resize="crop", image_size=56)
    proc = ImageProcessor(cfg, patch_size=14)
    # (70, 900): Pillow resizes that one vertical pass first, and so must the shortcut.
    sizes = [(9, 200), (200, 9), (33, 70), (71, 40), (70, 900), (900, 70), (3, 2000)]
    imgs = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    exact = [proc(img).pixel_values for img in imgs]
    monkeypatch.setattr(image_mod, "_MAX_INTERMEDIATE_PIXELS", 0)  # force the box path
    for img, ref in zip(imgs, exact):
        got = proc(img).pixel_values
        assert (got - ref).abs().max() <= 1.01 / 255 / min(cfg.std)  # at most one grey level
    assert proc(Image.new("RGB", (1, 5000))).pixel_values.shape == (1, 3, 56, 56)


def test_pad_mode_centres_on_mean_colour():
    s = 28
    cfg = ImageConfig(mode="fixed", resize="pad", image_size=s)
    mean = torch.tensor(cfg.mean).view(3, 1)
    std = torch.tensor(cfg.std).view(3, 1)
    out = ImageProcessor(cfg, patch_size=14)(Image.new("RGB", (80, 40), (0, 0, 0)))
    px = out.pixel_values[0]  # (3, s, s): black band in the middle rows, mean colour above/below
    fill = torch.tensor([int(255 * m) for m in cfg.mean]).view(3, 1) / 255
    torch.testing.assert_close(px[:, 0, :], ((fill - mean) / std).expand(3, s))
    torch.testing.assert_close(px[:, s - 1, :], ((fill - mean) / std).expand(3, s))
    torch.testing.assert_close(px[:, s // 2, :], ((0 - mean) / std).expand(3, s))
    assert out.num_tokens == 4


def expand2square_resize(img: Image.Image, fill: tuple[int, int, int], s: int) -> Image.Image:
    """The reference: LLaVA's padded square, resized by Pillow."""
    w, h = img.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), fill)
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    return square.resize((s, s), Image.Resampling.BICUBIC)


# Wide, tall, near-square, odd and even side differences (centring offsets), smaller and larger
# than image_size, one-pixel sides.
PAD_SIZES = [(40, 90), (90, 41), (7, 120), (121, 7), (1, 50), (50, 1), (2, 1), (1, 2), (20, 10),
             (10, 21), (299, 300), (301, 299), (1000, 3), (3, 999), (401, 500), (500, 400),
             (2000, 17), (17, 2001)]
FILLS = [(122, 116, 104), (0, 255, 7), (255, 0, 128), (3, 200, 254)]


@pytest.mark.parametrize("s", [28, 64, 224, 336])
def test_pad_without_the_square_is_bit_exact(s):
    for i, (w, h) in enumerate(PAD_SIZES):
        img = random_image(w, h, seed=i)
        fill = FILLS[i % len(FILLS)]
        got = np.asarray(resample.pad_resize(img, fill, s))
        ref = np.asarray(expand2square_resize(img, fill, s))
        assert got.shape == (s, s, 3)
        np.testing.assert_array_equal(got, ref, err_msg=f"{w} x {h} -> {s}, fill {fill}")


def test_pad_mode_takes_the_exact_path_above_the_limit(monkeypatch):
    cfg = ImageConfig(mode="fixed", resize="pad", image_size=56, mean=(0.9, 0.1, 0.45))
    proc = ImageProcessor(cfg, patch_size=14)
    sizes = [(300, 7), (7, 300), (57, 56), (90, 91)]
    imgs = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    direct = [proc(img).pixel_values for img in imgs]
    monkeypatch.setattr(image_mod, "_MAX_INTERMEDIATE_PIXELS", 0)  # every padded square is too big
    for img, ref in zip(imgs, direct):
        assert torch.equal(proc(img).pixel_values, ref), img.size


def test_pad_long_axis_pass_matches_pillow():
    # The kernels at a large scale (windows of ~12000 taps): the horizontal pass of a wide image is
    # Pillow's own one-axis resize.
    w, h, s = 1_000_003, 2, 336
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    win = resample._windows(w, s)
    bands = resample._bands(win, np.zeros(s), 0, w, 3 * h)

    def cols(a, b):  # (b-a, 3h)
        return arr[:, a:b].transpose(1, 0, 2).reshape(b - a, -1)

    acc = resample._apply(bands, cols, 0, s, 3 * h)
    got = resample._clip8(resample._HALF + acc).reshape(s, h, 3).transpose(1, 0, 2)
    ref = np.asarray(Image.fromarray(arr).resize((s, h), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(got, ref)


def thin_pad_reference(img: Image.Image, fill: tuple[int, int, int], s: int) -> np.ndarray:
    """expand2square + resize of a one-pixel-thin image by Pillow alone, one pass at a time (the
    square itself, side^2 pixels, is out of reach): the horizontal pass of each distinct row of
    the square, then Pillow's vertical pass over those rows."""
    w, h = img.size
    side = max(w, h)
    bicubic = Image.Resampling.BICUBIC
    if h == 1:  # rows: fill everywhere except the image row
        fill_row = Image.new("RGB", (side, 1), fill).resize((s, 1), bicubic)
        rows = np.repeat(np.asarray(fill_row), side, 0)  # (side, s, 3)
        rows[(side - 1) // 2] = np.asarray(img.resize((s, 1), bicubic))[0]
    else:  # row y is fill except pixel img[y] in the middle column: tabulate all 256 values
        table = np.empty((256, side, 3), dtype=np.uint8)
        table[:] = fill
        table[:, (side - 1) // 2] = np.arange(256)[:, None]
        table = np.asarray(Image.fromarray(table).resize((s, 256), bicubic))  # (256, s, 3)
        px = np.asarray(img)[:, 0]  # (side, 3)
        rows = table[px, :, np.arange(3)].transpose(0, 2, 1)  # (side, 3, s) -> (side, s, 3)
    return np.asarray(Image.fromarray(rows).resize((s, s), bicubic))  # only a vertical pass now


@pytest.mark.parametrize("size", [(30_001, 1), (1, 30_001), (100_000, 1), (1, 100_000)])
def test_pad_thin_image_matches_pillow(size):
    small = random_image(*(min(v, 301) for v in size))  # the reference itself, on a real square
    ref = np.asarray(expand2square_resize(small, FILLS[1], 64))
    np.testing.assert_array_equal(thin_pad_reference(small, FILLS[1], 64), ref)
    for s, fill in ((64, (122, 116, 104)), (336, (0, 255, 7))):
        img = random_image(*size, seed=s)
        got = np.asarray(resample.pad_resize(img, fill, s))
        np.testing.assert_array_equal(got, thin_pad_reference(img, fill, s), err_msg=f"{size}, {s}")


def peak_rss_growth_mb(fn):
    """(MB of resident memory added at the peak while fn runs, its result); Linux only."""
    def read(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak
    except OSError:
        pytest.skip("needs /proc/self/clear_refs to measure peak memory")
    before = read("VmRSS")
    result = fn()
    return read("VmHWM") - before, result


THIN_CONFIGS = [
    ImageConfig(mode="fixed", image_size=56, resize="pad"),
    ImageConfig(mode="fixed", image_size=336, resize="pad"),
    ImageConfig(mode="fixed", image_size=56, resize="crop"),
    ImageConfig(mode="fixed", image_size=336, resize="crop"),
    ImageConfig(mode="fixed", image_size=56, resize="resize"),
    ImageConfig(mode="dynamic", max_patches=64),
    ImageConfig(mode="tiles", image_size=56, max_tiles=4, overview=True),
]


@pytest.mark.parametrize("size", [(100_000, 1), (1, 100_000), (30_000, 1)])
@pytest.mark.parametrize("cfg", THIN_CONFIGS, ids=lambda c: f"{c.mode}-{c.resize}-{c.image_size}")
def test_thin_images_stay_small_in_every_mode(monkeypatch, cfg, size):
    # The padded square of 100000 x 1 would be 10^10 pixels (40 GB): no intermediate image may pass
    # the fixed-mode limit, and the peak memory stays far below any such canvas.
    img = random_image(*size)

    def guard(make):  # Image.new(mode, size, ...) and Image.resize(self, size, ...)
        def checked(*args, **kwargs):
            w, h = kwargs.get("size", args[1])
            assert w * h <= image_mod._MAX_INTERMEDIATE_PIXELS, f"{make.__name__} to {w} x {h}"
            return make(*args, **kwargs)
        return checked

    monkeypatch.setattr(Image, "new", guard(Image.new))
    monkeypatch.setattr(Image.Image, "resize", guard(Image.Image.resize))
    proc = ImageProcessor(cfg, patch_size=14)
    grown, out = peak_rss_growth_mb(lambda: proc(img))
    assert grown < 300, f"{grown} MB"
    n_crops, (gh, gw), _ = proc.layout(*size)
    assert out.pixel_values.shape == (n_crops, 3, gh * 14, gw * 14)
    assert out.num_tokens == proc.num_tokens(*size) == n_crops * gh * gw


def test_resize_mode_stretches_and_normalises():
    cfg = ImageConfig(mode="fixed", resize="resize", image_size=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = ImageProcessor(cfg, patch_size=14)(Image.new("RGB", (300, 7), (255, 0, 51)))
    px = out.pixel_values[0]
    torch.testing.assert_close(px[:, 5, 5], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))


def test_preprocess_and_sources(tmp_path):
    img = random_image(40, 30)
    path = tmp_path / "a.png"
    img.save(path)
    proc = ImageProcessor(ImageConfig(mode="dynamic", max_patches=16), patch_size=14)
    outs = [proc(source) for source in (img, path, str(path), png_bytes(img))]
    assert all(isinstance(o, ProcessedImage) for o in outs)
    for o in outs[1:]:
        torch.testing.assert_close(o.pixel_values, outs[0].pixel_values)


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_modes_to_rgb():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red shows the white background
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    assert np.asarray(load_image(rgba)).tolist() == [[[255, 255, 255], [0, 0, 255]]]

    half = load_image(Image.new("RGBA", (1, 1), (255, 0, 0, 128)))
    assert np.allclose(np.asarray(half)[0, 0], [255, 127, 127], atol=1)

    la = load_image(Image.new("LA", (1, 1), (0, 0)))
    assert np.asarray(la).tolist() == [[[255, 255, 255]]]

    grey = load_image(Image.new("L", (3, 2), 77))
    assert grey.mode == "RGB" and grey.size == (3, 2) and (np.asarray(grey) == 77).all()

    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert np.asarray(load_image(pal)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    pal.info["transparency"] = 0  # palette index 0 is see-through
    assert np.asarray(load_image(pal)).tolist() == [[[255, 255, 255], [200, 100, 50]]]

    cmyk = load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))
    assert cmyk.mode == "RGB" and (np.asarray(cmyk) == 255).all()


def test_load_16_bit_rescales(tmp_path):
    arr = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(arr)
    path = tmp_path / "deep.png"
    img16.save(path)
    for source in (img16, path):
        got = np.asarray(load_image(source))
        assert got[..., 0].tolist() == [[0, 128, 255]] and (got[..., 0] == got[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)
    out = ImageProcessor(ImageConfig(mode="dynamic"), patch_size=14)(path)
    assert out.original_size == (20, 40)


def test_load_sources_agree(tmp_path):
    img = random_image(9, 5)
    path = tmp_path / "x.png"
    img.save(path)
    expected = np.asarray(img)
    for source in (img, path, str(path), png_bytes(img), bytearray(png_bytes(img))):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and (np.asarray(loaded) == expected).all()


def test_load_errors(tmp_path):
    with pytest.raises(ImageError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")

    with pytest.raises(ImageError, match="cannot decode image"):
        load_image(b"definitely not an image")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ImageError, match="cannot decode image .*junk.jpg"):
        load_image(junk)

    buf = io.BytesIO()
    random_image(64, 64).save(buf, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cannot decode image .*cut.jpg"):
        load_image(truncated)

    with pytest.raises(ImageError, match=r"20 x 20 = 400 pixels, more than max_pixels = 100"):
        load_image(png_bytes(random_image(20, 20)), max_pixels=100)
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="got int"):
        load_image(123)


def test_decompression_bomb_becomes_image_error(monkeypatch):
    data = png_bytes(random_image(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 > 2 * 100: PIL refuses outright
    with pytest.raises(ImageError, match="too large"):
        load_image(data, max_pixels=10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # only PIL's warning; our limit governs
    assert load_image(data, max_pixels=10_000).size == (20, 20)


def test_processor_applies_max_pixels():
    proc = ImageProcessor(ImageConfig(mode="fixed", image_size=28, max_pixels=100), patch_size=14)
    with pytest.raises(ImageError, match="max_pixels = 100"):
        proc(Image.new("RGB", (11, 10)))


# --- split mode (Idefics3 / SmolVLM) -----------------------------------------------------------

SPLIT_SIZES = [(64, 64), (200, 100), (100, 200), (257, 31), (31, 257), (1000, 999), (63, 65), (2000, 3), (5, 5),
               (640, 480), (480, 640), (1, 1)]


@pytest.mark.parametrize(("tile", "longest"), [(64, 256), (48, 128), (64, 64)])
def test_split_mode_equals_idefics3s_processor(tile, longest):
    """Pixel for pixel the reference (transformers' Idefics3ImageProcessorPil, the PIL backend: its
    default backend needs torchvision): two Lanczos resizes, row-major tiles, the whole image last;
    rows and cols as its processor reports them (0, 0 for a single crop)."""
    idefics3 = pytest.importorskip("transformers.models.idefics3.image_processing_pil_idefics3")
    reference = idefics3.Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ours = ImageProcessor(ImageConfig(mode="split", image_size=tile, longest_edge=longest, mean=(0.5,) * 3,
                                      std=(0.5,) * 3), patch_size=16)
    for w, h in SPLIT_SIZES:
        img = random_image(w, h, seed=w * h)
        out = reference(images=[img], return_tensors="pt", return_row_col_info=True)
        expected = out["pixel_values"][0]  # (crops, 3, tile, tile)
        item = ours(img)
        assert item.pixel_values.shape == expected.shape, (w, h)
        assert torch.allclose(item.pixel_values, expected, atol=1e-6), (w, h)
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        assert item.tiles == ((rows, cols) if rows else (1, 1)), (w, h)
        assert item.num_tokens == ours.num_tokens(w, h) == expected.shape[0] * (tile // 16) ** 2


def test_split_mode_bounds_its_tiles():
    proc = ImageProcessor(ImageConfig(mode="split", image_size=512, longest_edge=2048), patch_size=16)
    assert proc.canvas(512, 512) == (4, 4) and proc.layout(512, 512)[0] == 17  # upscaled to 2048 x 2048
    assert proc.canvas(100000, 1) == (1, 4)
    with pytest.raises(ConfigError, match="longest_edge must be 0..4096"):
        ImageConfig(mode="split", longest_edge=5000)
