"""LLaVA padding without the padded square: Pillow's BICUBIC arithmetic (libImaging/Resample.c)
in numpy, bit for bit.

LLaVA-1.5 (and transformers' ``LlavaImageProcessor`` with ``do_pad``) pads an image to a square of
the mean colour and then resizes the square. A 100000 x 1 image would need a 100000^2 square (30 GB);
``pad_resize`` gives the same pixels from a few MB. An 8-bit resize is separable: a horizontal pass
over the rows the vertical pass needs, rounded to uint8, then a vertical pass; each output pixel
has its own window of integer weights (22 fractional bits). The padded square is the fill colour
except for the image, so only the windows that reach the image need its pixels; the rest follows
from each window's weight sum.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["pad_resize"]

# pad_resize works in blocks of about this many float64 values (8 MB).
_CHUNK = 1 << 20


_HALF, _ONE = 2.0 ** 21, 2.0 ** 22  # Resample.c: PRECISION_BITS = 22, sums start at 1 << 21


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Fixed-point sums -> 0..255 (Resample.c clip8: arithmetic >> 22, then clamp); in place."""
    acc *= 1.0 / _ONE
    np.floor(acc, out=acc)
    return np.clip(acc, 0.0, 255.0, out=acc)


def _windows(size: int, out: int) -> tuple:
    """(scale, center, lo, hi, inv) of Resample.c precompute_coeffs for BICUBIC over a whole axis:
    output o reads inputs lo[o]..hi[o]-1. Integer float arithmetic is exact in float64 (< 2^53)."""
    scale = float(np.float32(size)) / out  # the resize box is C floats: 2^24 + 1 becomes 2^24
    support = 2.0 * max(scale, 1.0)  # bicubic support 2, widened when downscaling
    center = (np.arange(out) + 0.5) * scale  # (out,)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # (int) truncates toward 0
    hi = np.minimum((center + support + 0.5).astype(np.int64), size)
    return scale, center, lo, hi, 1.0 / max(scale, 1.0)


def _kernel(win: tuple, o: int) -> np.ndarray:
    """Output o's integer weights, (hi[o] - lo[o],) float64, bit for bit as Resample.c computes
    them: the same double operations in the same order."""
    _, center, lo, hi, inv = win
    k = np.arange(lo[o], hi[o], dtype=np.float64)
    k -= center[o]
    k += 0.5
    k *= inv  # (x + xmin - center + 0.5) * inv_filterscale, nondecreasing in x
    # bicubic_filter (a = -0.5) branches on |x| < 1 and |x| < 2: index ranges of the sorted k.
    a, b = np.searchsorted(k, (-2.0, -1.0), side="right")
    c, d = np.searchsorted(k, (1.0, 2.0), side="left")
    np.abs(k, out=k)
    t = k[b:c]
    k[b:c] = (1.5 * t - 2.5) * t * t + 1.0  # ((a + 2) x - (a + 3)) x x + 1
    for p, q in ((a, b), (c, d)):
        t = k[p:q]
        k[p:q] = (((t - 5.0) * t + 8.0) * t - 4.0) * -0.5  # (((x - 5) x + 8) x - 4) a
    k[:a] = 0.0
    k[d:] = 0.0
    ww = np.cumsum(k)[-1]  # C adds left to right; np.sum's pairwise order can change the last bit
    if ww != 0.0:
        k /= ww
    k *= _ONE
    k += np.copysign(0.5, k)  # normalize_coeffs_8bpc: (int)(k * 2^22 +- 0.5), half away from zero
    return np.trunc(k, out=k)


def _bands(win: tuple, ksum: np.ndarray, off: int, m: int, width: int):
    """The weights on inputs off..off+m-1 in dense blocks: yields (a, b, o0, o1, k), k the
    (o1-o0, b-a) weights of outputs o0..o1-1 on inputs a..b-1. A block of inputs times ``width``
    data columns stays within CHUNK values. Each kernel is made once, kept while its window is
    open, and its sum stored in ``ksum``."""
    scale, _, lo, hi, _ = win
    # At most ~2 scales of inputs per block: ~7 windows open, so the block is mostly weights.
    step = max(1, min(_CHUNK // width, _CHUNK // 8, 2 * math.ceil(scale)))
    kern = {}
    made = done = int(np.searchsorted(hi, off, side="right"))  # first window reaching off
    for a in range(off, off + m, step):
        b = min(a + step, off + m)
        while made < len(lo) and lo[made] < b:
            k = _kernel(win, made)
            ksum[made] = k.sum()
            kern[made] = k.astype(np.float32)  # |weights| < 2^23: exact, half the memory
            made += 1
        while hi[done] <= a:  # windows only move right: this one is closed
            del kern[done]
            done += 1
        k = np.zeros((made - done, b - a))
        for o in range(done, made):
            p, q = max(lo[o], a), min(hi[o], b)
            k[o - done, p - a:q - a] = kern[o][p - lo[o]:q - lo[o]]
        yield a, b, done, made, k


def _apply(bands, rows, i0: int, i1: int, width: int) -> np.ndarray:
    """Sum of weight * input for outputs i0..i1-1: (i1-i0, width) float64. ``rows(a, b)`` gives
    inputs a..b-1 as (b-a, width). The sums are integers below 2^31 (Pillow's are C ints), so
    float64 matmuls (exact to 2^53) give them exactly, in any order."""
    acc = np.zeros((i1 - i0, width))
    for a, b, o0, o1, k in bands:
        acc[o0 - i0:o1 - i0] += k @ rows(a, b)
    return acc


def pad_resize(img: Image.Image, fill: tuple[int, int, int], size: int) -> Image.Image:
    """expand2square then BICUBIC resize to ``size`` x ``size``: pixel-identical to building the
    max(w, h)^2 square and calling Image.resize, with working memory of a few CHUNKs."""
    w, h = img.size
    win = _windows(max(w, h), size)  # the square: one table serves both axes
    ksum = np.zeros(size)  # (size,) each window's integer weight sum
    fill = np.array(fill, dtype=np.float64)  # (3,)
    # A window of fill values v sums to v * ksum; the image adds weight * (pixel - v) on top.
    if w > h:
        # The image spans the width: its h rows are ordinary horizontal passes (hc); every other
        # row of the square becomes the fill row hf, which the vertical pass reads as such.
        def cols(a: int, b: int) -> np.ndarray:  # (b-a, 3h): image columns a..b-1
            x = np.asarray(img.crop((a, 0, b, h)))  # (h, b-a, 3)
            return x.transpose(1, 0, 2).reshape(b - a, 3 * h).astype(np.float64)

        hc = _apply(_bands(win, ksum, 0, w, 3 * h), cols, 0, size, 3 * h)  # (size, 3h): [i, y*3+c]
        hc += _HALF
        hc = _clip8(hc).reshape(size, h, 3).transpose(1, 0, 2).reshape(h, 3 * size)
        hf = _clip8(_HALF + ksum[:, None] * fill).reshape(-1)  # (3 size,): [i*3+c]
        top = (w - h) // 2
        hc -= hf  # (h, 3 size): [y, i*3+c]
        bands = _bands(win, ksum, top, h, 3 * size)
        acc = _apply(bands, lambda a, b: hc[a - top:b - top], 0, size, 3 * size)
        out = _clip8(_HALF + ksum[:, None] * hf + acc)  # (size, 3 size): [j, i*3+c]
    else:
        # The image spans the height: each row's horizontal pass is the fill row except in the
        # output columns i0..i1-1 whose windows reach the image. Those few columns (rows, computed
        # block by block as the vertical pass asks for them) then take an ordinary vertical pass.
        left = (h - w) // 2
        bands = list(_bands(win, ksum, left, w, 1))  # about 7 w weights, reused for every row
        i0, i1 = bands[0][2], bands[-1][3]
        n = i1 - i0
        base = _HALF + fill[:, None] * ksum[i0:i1]  # (3, n)

        def hrows(a: int, b: int) -> np.ndarray:  # (b-a, 3n): columns i0..i1-1 of rows a..b-1
            x = np.asarray(img.crop((0, a, w, b))) - fill  # (b-a, w, 3)
            x = x.transpose(0, 2, 1).reshape(-1, w)  # (3(b-a), w): [y*3+c, x]
            acc = np.empty((b - a, 3, n))
            acc[:] = base
            acc = acc.reshape(-1, n)  # (3(b-a), n)
            for p, q, o0, o1, k in bands:
                acc[:, o0 - i0:o1 - i0] += x[:, p - left:q - left] @ k.T
            return _clip8(acc).reshape(b - a, 3 * n)

        v = _apply(_bands(win, ksum, 0, h, 3 * max(w, n)), hrows, 0, size, 3 * n)  # [j, c*n+i]
        hf = _clip8(_HALF + ksum[:, None] * fill).reshape(-1)  # (3 size,): [i*3+c]
        # Columns out of the image's reach see fill rows only; columns i0..i1-1 come from v.
        out = _clip8(_HALF + ksum[:, None] * hf)  # (size, 3 size): [j, i*3+c]
        v = _clip8(_HALF + v).reshape(size, 3, n).transpose(0, 2, 1)  # (size, n, 3)
        out.reshape(size, size, 3)[:, i0:i1] = v
    return Image.fromarray(out.reshape(size, size, 3).astype(np.uint8))
