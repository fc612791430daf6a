"""Tile canvases: the grids a tiled image may take and the best-fit choice among them.

One list and one canvas choice for the image processor (``ImageProcessor.canvas``), the Mllama
aspect-ratio ids and the planner's token rules (Llama 3.2 Vision, Llama 4). Pure Python (no torch),
so ``planner/tokens.py`` imports it without the model.

One labelling: a canvas is ``(rows, cols)``, tiles down and tiles across. Printed, it reads as an
image size does, width first: ``canvas_label(1, 2) == "2x1"``. Hugging Face's
``get_all_supported_aspect_ratios`` names its pairs (width, height), but
``get_optimal_tiled_canvas`` reads the first of each pair as the canvas height: the same list,
rows first.
"""

from __future__ import annotations

__all__ = ["best_canvas", "canvas_label", "rescale_longest_edge", "supported_aspect_ratios"]


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows * cols <= max_tiles, rows major: Mllama's aspect-ratio id order
    (id = index + 1; 8 canvases for 4 tiles)."""
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def best_canvas(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of Mllama's ``get_optimal_tiled_canvas`` (Llama 4's ``get_best_fit`` makes the
    same choice): over the supported canvases, the scale that fits the image inside each (its
    limiting side); the smallest scale >= 1 wins (least upscaling), else the largest (least
    downscaling); ties go to the smallest area, the first in id order among equal areas."""
    canvases = supported_aspect_ratios(max_tiles)
    scales = [min(c * tile / width, r * tile / height) for r, c in canvases]  # the reference's float operations
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [rc for rc, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda rc: rc[0] * rc[1])  # min() keeps the first of equal areas


def canvas_label(rows: int, cols: int) -> str:
    """``COLSxROWS``, width first like an image size."""
    return f"{cols}x{rows}"


def rescale_longest_edge(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(w, h) with the long side at ``longest_edge`` (up or down), the short side truncated, then
    rounded up to even (Idefics3ImageProcessor's first resize)."""
    aspect = width / height
    if width >= height:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        w, h = int(longest_edge * aspect), longest_edge
        w += w % 2
    return max(w, 1), max(h, 1)

