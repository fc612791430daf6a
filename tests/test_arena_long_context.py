"""The long-context recall-N skills and the arenas of issue 14: a key, N distractor tokens, the
question; scored per distance with each strategy's cache at that distance; and dense against
mixture-of-experts decoders compared at equal active parameters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from omnifuse.arena.run import load_arena_config, run_arena
from omnifuse.config import ConfigError, load_config
from omnifuse.planner.costs import active_parameters, count_parameters
from omnifuse.training.diagnostic import DiagnosticSet, answer_set, chance_level, skill_media
from omnifuse.training.diagnostic_text import KEY_ALPHABET, RECALL_QUESTION

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 17, 300])
def test_a_recall_sample_states_the_key_then_exactly_n_distractor_tokens_then_asks(n):
    skill = f"recall-{n}"
    data = DiagnosticSet("train", 40, skills=[skill])
    seen = set()
    for i in range(len(data)):
        s = data[i]
        head, rest = s.question[:8], s.question[8:]
        assert head == f"key: {s.answer}. " and s.skill == skill and s.media == {}
        assert rest.endswith(" " + RECALL_QUESTION)
        distractors = rest[: -len(RECALL_QUESTION) - 1]
        assert len(distractors) == n and distractors == distractors.strip()
        assert not set(distractors) & set(KEY_ALPHABET) and "key" not in distractors
        assert s.answer in answer_set(skill)
        seen.add(s.answer)
    assert len(seen) == 10  # keys vary over the 10 answers
    assert chance_level(skill) == 1 / 10 and skill_media(skill) == ()


def test_recall_splits_share_no_sample_and_are_reproducible():
    train = DiagnosticSet("train", 200, skills=["recall-32"])
    test = DiagnosticSet("test", 200, skills=["recall-32"])
    assert not {train[i].question for i in range(200)} & {test[i].question for i in range(200)}
    again = DiagnosticSet("test", 200, skills=["recall-32"])
    assert [test[i].question for i in range(5)] == [again[i].question for i in range(5)]


@pytest.mark.parametrize("name", ["recall-0", "recall-01", "recall-x", "recall-", "recall-100001", "recall"])
def test_a_malformed_recall_skill_is_named(name):
    with pytest.raises(ConfigError, match=rf"unknown skill '{name}'.*recall-N"):
        DiagnosticSet("train", 4, skills=[name])


def _text_model(tmp_path, name: str, extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nvision: null\ntext: {{tokenizer: bytes}}\n"
                    "decoder: {vocab_size: 262, hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 2, "
                    f"intermediate_size: 64, max_position: 256{extra}}}\n")
    return path


def test_the_long_context_arena_scores_each_distance_with_its_cache(tmp_path):
    models = {"full": "", "sliding": ", layer_pattern: [{attention: sliding}], sliding_window: 16",
              "infini": ", layer_pattern: [{attention: infini}], memory_segment: 8"}
    for name, extra in models.items():
        _text_model(tmp_path, name, extra)
    (tmp_path / "arena.yaml").write_text(
        "strategies:\n" + "".join(f"  - {{name: {n}, model: {n}.yaml}}\n" for n in models)
        + "skills: [recall-8, recall-40, recall-120]\nsteps: 3\nbatch_size: 4\nwarmup_steps: 0\ntrain_size: 60\n"
        f"val_size: 6\nmax_length: 200\ntest_size: 12\nlatency_prompts: 1\ndecode_tokens: 2\nout_dir: {tmp_path / 'out'}\n")
    config = load_arena_config(tmp_path / "arena.yaml")
    report = run_arena(config)
    rows = {r["name"]: r for r in report["strategies"]}
    kv = {name: [r[f"kv_cache_bytes/recall-{n}"] for n in (8, 40, 120)] for name, r in rows.items()}
    slot = 2 * 2 * 16 * 4 * 2  # K and V, 2 heads of 16, float32, 2 layers
    assert kv["full"][2] - kv["full"][1] == 80 * slot  # the full cache grows with the distance
    assert kv["sliding"][1] == kv["sliding"][2] == 16 * slot  # the window's ring once the prompt outgrows it
    assert kv["infini"][1] == kv["infini"][2] > 8 * slot  # a segment's ring plus the memory
    for r in rows.values():
        assert set(r) >= {f"accuracy/recall-{n}" for n in (8, 40, 120)}
        assert r["context_tokens/recall-120"] - r["context_tokens/recall-8"] == 112
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Long context" in text and "| strategy | N = 8 | N = 40 | N = 120 |" in text
    assert (tmp_path / "out" / "accuracy_vs_distance.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skills"] == ["recall-8", "recall-40", "recall-120"]


def test_the_shipped_long_context_arena_gives_both_bounded_caches_the_same_memory():
    config = load_arena_config(ROOT / "configs" / "arena-long-context.yaml")
    from omnifuse.planner.costs import bounded_kv_bytes, kv_bytes_per_token

    models = {s.name: load_config(s.model) for s in config.strategies}
    assert bounded_kv_bytes(models["full"]) == 0 and kv_bytes_per_token(models["full"]) > 0
    sliding, infini = bounded_kv_bytes(models["sliding"]), bounded_kv_bytes(models["infini"])
    assert kv_bytes_per_token(models["sliding"]) == kv_bytes_per_token(models["infini"]) == 0
    assert abs(infini - sliding) / sliding < 0.05
    longest = max(int(s.split("-")[1]) for s in config.train["skills"])
    assert longest > models["sliding"].decoder.sliding_window * models["sliding"].decoder.num_layers  # out of its reach


def test_the_moe_arena_matches_active_parameters_and_refuses_a_total_mismatch(tmp_path):
    config = load_arena_config(ROOT / "configs" / "arena-moe.yaml")
    assert config.match == "active"
    counts = {}
    for s in config.strategies:
        model = load_config(s.model)
        counts[s.name] = {"total": count_parameters(model)["total"], "active": active_parameters(model)}
    dense, moe = counts["dense"], counts["moe"]
    assert dense["active"] == dense["total"] and abs(moe["active"] - dense["active"]) / dense["active"] < 0.01
    assert moe["total"] > 1.5 * dense["total"]
    # the same strategies compared by total parameters are refused before anything trains
    with pytest.raises(ConfigError, match="total parameter counts differ by more than 10%"):
        run_arena(dataclasses.replace(config, match="total", out_dir=str(tmp_path)))
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies:\n  - {name: a, model: tiny-early}\nmatch: experts\n")
    with pytest.raises(ConfigError, match="match must be total or active"):
        load_arena_config(bad)
