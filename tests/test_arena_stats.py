"""The arena's statistics: Wilson intervals, what they allow the report to claim, pooled seeds."""

from __future__ import annotations

import pytest

from omnifuse.arena.run import _pool
from omnifuse.arena.stats import findings, wilson


def test_wilson_intervals_match_the_formula_at_known_points():
    lo, hi = wilson(30, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.2189, 0.3958)
    assert wilson(0, 20)[0] == 0.0 and 0.16 < wilson(0, 20)[1] < 0.17  # never below 0, not degenerate
    assert wilson(20, 20)[1] == 1.0 and wilson(20, 20)[0] > 0.83
    assert wilson(0, 0) == (0.0, 1.0)


def row(name, acc, n=100):
    return {"name": name, "interval": {"s": wilson(acc * n, n)}}


def test_thirty_percent_against_a_quarter_on_a_hundred_samples_is_not_above_chance():
    text = findings([row("early", 0.30), row("cross", 0.27)], ["s"], {"s": 0.25})[0]
    assert "early, cross not distinguishable from chance (25%)" in text
    assert "no difference between strategies beyond the intervals" in text


def test_clear_differences_are_claimed_and_named():
    text = findings([row("early", 0.90), row("cross", 0.45, n=300)], ["s"], {"s": 0.25})[0]
    assert "early, cross above chance (25%)" in text and "early beats cross" in text


def test_seeds_pool_their_answers_and_report_the_spread():
    runs = [{"name": "e", "accuracy": a, "accuracy/s": a, "count": 50, "count/s": 50, "train_seconds": 1.0}
            for a in (0.4, 0.6)]
    pooled = _pool(runs, ["s"])
    assert pooled["accuracy"] == pytest.approx(0.5) and pooled["accuracy_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert pooled["count/s"] == 100 and pooled["accuracy/s_runs"] == [0.4, 0.6]


def test_an_interval_below_chance_is_called_below_chance():
    text = findings([row("early", 0.25, n=300)], ["s"], {"s": 0.5})[0]
    assert text == "**s**: early below chance (50%)."


def _strategy(name, tokens, ocr, counting, n=200):
    return {"name": name, "visual_tokens_per_image": tokens, "accuracy/ocr": ocr, "accuracy/counting": counting,
            "interval": {"ocr": wilson(ocr * n, n), "counting": wilson(counting * n, n)}}


def test_compression_findings_compare_fewer_tokens_with_the_most_on_detail_skills():
    from omnifuse.arena.stats import compression_findings

    chance = {"ocr": 1 / 64, "counting": 1 / 6, "colour": 1 / 6}
    rows = [_strategy("llava", 64, 0.50, 0.60), _strategy("blip2", 32, 0.20, 0.58), _strategy("idefics3", 16, 0.52, 0.30)]
    text = compression_findings(rows, ["colour", "ocr", "counting"], chance)
    assert len(text) == 3
    assert text[0].startswith("**blip2** (32 tokens/image against llava's 64)")
    assert "ocr 20%" in text[0] and "(lower beyond the intervals)" in text[0]
    assert "counting 58%" in text[0] and "no difference beyond the intervals" in text[0]
    assert "for blip2 on ocr, idefics3 on counting;" in text[2]
    assert "did not show (within the intervals) for blip2 on counting, idefics3 on ocr." in text[2]
    # equal token counts, or no detail skill in the run: nothing to say
    assert compression_findings([_strategy("a", 64, 0.5, 0.5), _strategy("b", 64, 0.1, 0.1)], ["ocr"], chance) == []
    assert compression_findings(rows, ["colour"], chance) == []
    # a baseline at chance on a skill cannot test the claim there
    rows = [_strategy("llava", 64, 0.02, 0.60), _strategy("blip2", 32, 0.01, 0.20)]
    text = compression_findings(rows, ["ocr", "counting"], chance)
    assert "ocr" not in text[0] and "counting 20%" in text[0]
    assert text[-1].endswith("llava itself is not above chance on ocr, so this run cannot test the claim there.")
    assert compression_findings(rows, ["ocr"], chance) == [
        "llava itself is not above chance on ocr, so this run cannot test whether compression loses that detail."]
