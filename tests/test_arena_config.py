"""Arena configs: strategies as entries, including inference-only ones (`from` a trained strategy
with token merging), and the errors a malformed entry gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnifuse.arena.run import load_arena_config
from omnifuse.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, strategies: str) -> Path:
    path = tmp_path / "arena.yaml"
    path.write_text(f"strategies:\n{strategies}\nsteps: 3\n")
    return path


def test_the_connectors_arena_config_is_valid_and_derives_tome_from_llava():
    config = load_arena_config(ROOT / "configs" / "arena-connectors.yaml")
    names = [s.name for s in config.strategies]
    assert names[:4] == ["llava", "blip2", "flamingo", "idefics3"]
    tome = [s for s in config.strategies if s.source]
    assert {s.source for s in tome} == {"llava"} and all(s.merge_tokens > 0 for s in tome)
    assert all(s.model == config.strategies[0].model for s in tome)
    from omnifuse.config import load_config

    types = {s.name: load_config(s.model).connector.type for s in config.strategies if not s.source}
    assert types == {"llava": "mlp", "blip2": "qformer", "flamingo": "perceiver", "idefics3": "pixel_shuffle"}


@pytest.mark.parametrize(("entries", "message"), [
    ("  - {name: a, from: b, merge_tokens: 4}", "`from: b` must name a trained strategy listed before it"),
    ("  - {name: a, model: tiny-early}\n  - {name: t, from: a, merge_tokens: 0}", "merge_tokens must be a positive"),
    ("  - {name: a, model: tiny-early}\n  - {name: t, from: a, merge_tokens: 4, steps: 9}",
     r"takes only name, from and merge_tokens \(got \['steps'\]\)"),
    ("  - {name: a, model: tiny-early, merge_tokens: 4}", "merge_tokens is an inference setting"),
    ("  - {name: a, model: tiny-early}\n  - {name: t, from: a, merge_tokens: 2}\n  - {name: u, from: t, merge_tokens: 2}",
     "`from: t` must name a trained strategy"),
])
def test_malformed_derived_strategies_are_named(tmp_path, entries, message):
    with pytest.raises(ConfigError, match=message):
        load_arena_config(_write(tmp_path, entries))
