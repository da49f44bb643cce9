"""Sweep progress: a live rich display on a terminal, plain log lines everywhere else.

On a terminal one line stays at the bottom: trials done/total, the running trial and its epoch,
the best result so far, elapsed time and ETA (measured in epochs, so a half-done trial counts),
while the per-epoch log lines scroll above it. Not on a terminal (CI, `> log`), nothing is drawn:
the objective's timestamped log lines already say the same, one per event.
"""

from __future__ import annotations

import logging
import math
import sys
import time


class Progress:
    """The plain version: the log lines are the progress report."""

    def __init__(self, planned: int, epochs: int, metric: str, direction: str, stream=None):
        self.planned, self.epochs, self.metric, self.direction = planned, epochs, metric, direction
        self.stream = stream
        self.done = 0
        self.best: tuple[float, str] | None = None
        self._epoch = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def trial_started(self, number: int, label: str) -> None:
        self._epoch = 0
        self.current = f"trial {number} ({label})"

    def epoch_done(self, epoch: int) -> None:
        self._epoch = epoch

    def trial_finished(self, value: float | None = None, label: str = "") -> None:
        self.done += 1
        if value is not None and math.isfinite(value):
            better = self.best is None or (value > self.best[0] if self.direction == "maximize"
                                           else value < self.best[0])
            if better:
                self.best = (value, label)

    def best_text(self) -> str:
        if self.best is None:
            return "best: -"
        value, label = self.best
        shown = f"{100 * value:.1f}%" if self.metric in ("eval_accuracy", "eval_f1") else f"{value:.4f}"
        return f"best: {label} {self.metric}={shown}"


class LiveProgress(Progress):
    """rich.progress on the terminal; log records go through rich so they print above the bar."""

    def __enter__(self):
        from rich.console import Console
        from rich.logging import RichHandler
        from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self.console = Console(file=self.stream, force_terminal=True) if self.stream else Console()
        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[trials]}"),
                       TextColumn("{task.fields[current]}"), TextColumn("[green]{task.fields[best]}"),
                       TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                       console=self.console, refresh_per_second=2)
        self.task = self.bar.add_task("sweep", total=self.planned * self.epochs, trials=self._trials(),
                                      current="", best=self.best_text(), eta="?")
        self._start = time.monotonic()
        self._units = 0
        root = logging.getLogger()
        self._handlers = root.handlers[:]
        handler = RichHandler(console=self.console, show_path=False, show_level=False, markup=False,
                              log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.handlers = [handler]
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()
        logging.getLogger().handlers = self._handlers

    def _trials(self) -> str:
        return f"{self.done}/{self.planned} trials"

    def _update(self, advance: int = 0, **kw) -> None:
        # ETA from the sweep's own mean pace per epoch (rich's estimate needs several updates inside a
        # 30 s window; one epoch can take longer than that).
        self._units += advance
        left = self.planned * self.epochs - self._units
        eta = "?"
        if self._units:
            seconds = int((time.monotonic() - self._start) / self._units * left)
            eta = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        self.bar.update(self.task, advance=advance, trials=self._trials(), best=self.best_text(), eta=eta, **kw)

    def trial_started(self, number: int, label: str) -> None:
        super().trial_started(number, label)
        self._update(current=f"{self.current} epoch 1/{self.epochs}")

    def epoch_done(self, epoch: int) -> None:
        super().epoch_done(epoch)
        nxt = f"epoch {min(epoch + 1, self.epochs)}/{self.epochs}" if epoch < self.epochs else "saving"
        self._update(advance=1, current=f"{self.current} {nxt}")

    def trial_finished(self, value: float | None = None, label: str = "") -> None:
        left = self.epochs - self._epoch  # a pruned or failed trial skips its remaining epochs
        super().trial_finished(value, label)
        self._update(advance=left, current="")


def progress_for(planned: int, epochs: int, metric: str, direction: str, stream=None) -> Progress:
    """LiveProgress when `stream` (stdout by default) is a terminal, else the plain one."""
    live = hasattr(stream or sys.stdout, "isatty") and (stream or sys.stdout).isatty()
    return (LiveProgress if live else Progress)(planned, epochs, metric, direction, stream)
