"""How sure the arena's accuracies are: 95% Wilson score intervals, and which differences (between
strategies, and against chance) are larger than their intervals.

A difference counts only when the intervals do not overlap: a conservative reading (non-overlapping
95% intervals mean a difference well past the 5% level), so "beats chance" is never claimed for a
result within sampling noise of it.
"""

from __future__ import annotations

import math

__all__ = ["Z95", "findings", "wilson"]

Z95 = 1.959963984540054


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` successes out of ``n`` (``correct`` may be a pooled
    mean times ``n``). (0, 1) when there are no samples."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(p: float) -> str:
    return f"{p:.1%}" if p < 0.1 else f"{p:.0%}"


def findings(rows: list[dict], skills: list[str], chance: dict[str, float]) -> list[str]:
    """Sentences on what the intervals support: per skill, which strategies are above chance and
    which pairs of strategies differ."""
    out = []
    for s in skills:
        above, unsure, below = [], [], []
        for r in rows:
            lo, hi = r["interval"][s]
            (above if lo > chance[s] else below if hi < chance[s] else unsure).append(r["name"])
        parts = []
        if above:
            parts.append(f"{', '.join(above)} above chance ({_pct(chance[s])})")
        if unsure:
            parts.append(f"{', '.join(unsure)} not distinguishable from chance ({_pct(chance[s])})")
        if below:
            parts.append(f"{', '.join(below)} below chance ({_pct(chance[s])})")
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                (alo, ahi), (blo, bhi) = a["interval"][s], b["interval"][s]
                if alo > bhi or blo > ahi:
                    hi, lo = (a, b) if alo > bhi else (b, a)
                    parts.append(f"{hi['name']} beats {lo['name']}")
        if len(rows) > 1 and not any(" beats " in p for p in parts):
            parts.append("no difference between strategies beyond the intervals")
        out.append(f"**{s}**: " + "; ".join(parts) + ".")
    return out


def compression_findings(rows: list[dict], skills: list[str], chance: dict[str, float],
                         detail: tuple[str, ...] = ("ocr", "counting")) -> list[str]:
    """Sentences on the claim that compressing an image into fewer tokens loses fine-grained
    detail (OCR, counting): each strategy with fewer visual tokens per image than the one with the
    most, on each detail skill, against the intervals. A skill the baseline itself does not learn
    (its interval reaches chance) cannot test the claim, and is said to. Empty when the
    strategies' token counts are equal or the run has no detail skill."""
    rows = [r for r in rows if r.get("visual_tokens_per_image")]
    detail = tuple(s for s in detail if s in skills)
    if not detail or len({r["visual_tokens_per_image"] for r in rows}) < 2:
        return []
    base = max(rows, key=lambda r: r["visual_tokens_per_image"])
    untestable = [s for s in detail if base["interval"][s][0] <= chance[s]]
    detail = tuple(s for s in detail if s not in untestable)
    if not detail:
        return [f"{base['name']} itself is not above chance on {' or '.join(untestable)}, so this run cannot test "
                "whether compression loses that detail."]
    out, worse, not_shown = [], set(), set()
    for r in rows:
        if r["visual_tokens_per_image"] >= base["visual_tokens_per_image"]:
            continue
        parts = []
        for s in detail:
            (lo, hi), (blo, bhi) = r["interval"][s], base["interval"][s]
            verdict = "lower beyond the intervals" if hi < blo else \
                "higher beyond the intervals" if lo > bhi else "no difference beyond the intervals"
            (worse if hi < blo else not_shown).add(f"{r['name']} on {s}")
            parts.append(f"{s} {r[f'accuracy/{s}']:.0%} [{100 * lo:.0f}–{100 * hi:.0f}] vs "
                         f"{base[f'accuracy/{s}']:.0%} ({verdict})")
        out.append(f"**{r['name']}** ({r['visual_tokens_per_image']:g} tokens/image against {base['name']}'s "
                   f"{base['visual_tokens_per_image']:g}): " + "; ".join(parts) + ".")
    summary = "Compression lost fine-grained detail in this run for " + (", ".join(sorted(worse)) or "none")
    summary += "; it did not show (within the intervals) for " + (", ".join(sorted(not_shown)) or "none") + "."
    if untestable:
        summary += (f" {base['name']} itself is not above chance on {' or '.join(untestable)}, so this run cannot "
                    "test the claim there.")
    return [*out, summary]
