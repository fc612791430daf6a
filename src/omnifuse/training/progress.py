"""Progress of a training run: a live bar on a terminal, plain lines anywhere else.

A rich bar redraws in place, which a log file cannot show: with output redirected it would appear
only when the run ends. Off a terminal every report is therefore a plain, flushed line (the first
step, then at most one every ``every`` seconds, and the last), so ``tail -f`` follows a run.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["StepProgress"]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _loss(loss: float | None) -> str:
    return "-" if loss is None or math.isnan(loss) else f"{loss:.4f}"  # "-": no step has a loss yet


class StepProgress:
    def __init__(self, description: str, total: int, start: int = 0, enabled: bool = True,
                 every: float = 10.0, console: Console | None = None) -> None:
        self.description, self.total, self.start, self.every = description, total, start, every
        self.enabled = enabled
        self.console = console or Console()
        self.live = enabled and self.console.is_terminal
        self._bar: Progress | None = None
        self._t0 = self._last_line = time.perf_counter()

    def __enter__(self) -> StepProgress:
        self._t0 = time.perf_counter()
        if self.live:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]:.2f} step/s"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.start,
                                            loss=_loss(None), rate=0.0)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, done: int, loss: float | None) -> None:
        """Step ``done`` (1-based) finished with ``loss`` (None or NaN: no usable rows)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (done - self.start) / max(now - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, loss=_loss(loss), rate=rate)
            return
        if done - self.start == 1 or done == self.total or now - self._last_line >= self.every:
            self._last_line = now
            eta = (self.total - done) / rate if rate > 0 else 0.0
            print(f"{self.description}: step {done}/{self.total} loss {_loss(loss)} {rate:.2f} step/s "
                  f"elapsed {_clock(now - self._t0)} ETA {_clock(eta)}", flush=True)
