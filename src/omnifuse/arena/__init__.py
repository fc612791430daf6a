"""The fusion arena: fusion strategies trained on the same data and budget, measured side by side."""

from omnifuse.arena.run import ArenaConfig, load_arena_config, run_arena

__all__ = ["ArenaConfig", "load_arena_config", "run_arena"]
