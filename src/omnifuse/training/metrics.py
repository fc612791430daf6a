"""A run's metrics log: ``out_dir/metrics.jsonl``, one JSON record per line, each with its step.

A fresh run starts a fresh log; a resumed run first forgets the records logged after the
checkpoint it resumes from, so the log reads as if the run had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MetricsLog"]


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        """``enabled``: False in every process but the main one (they write nothing)."""
        self.path, self.enabled = Path(path), enabled

    def restart(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def keep_until(self, step: int) -> None:
        """Drop the records of steps after ``step``."""
        if self.enabled and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def append(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
