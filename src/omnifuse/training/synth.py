"""What the diagnostic set is made of: flat Pillow shapes on a light canvas, and numpy tones.

Both are plain functions of their parameters, so a sample is reproducible from its key alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["BACKGROUND", "COLOURS", "SHAPES", "Shape", "canvas", "draw_shape", "side_range", "tones"]

# Saturated colours far apart in RGB, so a 16-pixel patch average still names one unambiguously.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
    "orange": (240, 120, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)

# A shape is (name, colour, x, y, side): its bounding box is [x, x + side) x [y, y + side).
Shape = tuple[str, str, int, int, int]


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: tuple[int, int, int] | None = None) -> None:
    """``shape`` in its colour (or ``fill``)."""
    name, colour, x, y, side = shape
    fill = fill or COLOURS[colour]
    x1, y1 = x + side - 1, y + side - 1  # Pillow boxes include their far edge
    if name == "circle":
        draw.ellipse((x, y, x1, y1), fill=fill)
    elif name == "square":
        draw.rectangle((x, y, x1, y1), fill=fill)
    else:
        draw.polygon([(x + (side - 1) // 2, y), (x, y1), (x1, y1)], fill=fill)


def canvas(n: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (n, n), BACKGROUND)
    return img, ImageDraw.Draw(img)


def side_range(n: int, frac: tuple[float, float]) -> tuple[int, int]:
    """Shape sides (pixels) for fractions of an ``n``-pixel image side."""
    return max(3, round(frac[0] * n)), max(3, round(frac[1] * n))


_RAMP_MS = 5  # raised-cosine onset and release: no click at a tone's edges
_AMPLITUDE = 0.5
_NOISE = 0.005  # a faint noise floor, as any recording has


def tones(seconds: float, rate: int, parts: list[tuple[int, int, int]], noise_seed: int) -> np.ndarray:
    """A float32 mono clip of ``seconds`` at ``rate`` Hz holding sine tones ``(start_ms, length_ms,
    hz)`` over a faint noise floor drawn from ``noise_seed``."""
    out = np.random.default_rng(noise_seed).normal(0.0, _NOISE, round(seconds * rate))
    ramp = round(_RAMP_MS * rate / 1000)
    for start_ms, length_ms, hz in parts:
        a, n = round(start_ms * rate / 1000), round(length_ms * rate / 1000)
        t = np.arange(n) / rate
        wave = _AMPLITUDE * np.sin(2 * np.pi * hz * t)
        edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        wave[:ramp] *= edge
        wave[n - ramp:] *= edge[::-1]
        out[a:a + n] += wave
    return out.astype(np.float32)
