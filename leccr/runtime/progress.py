"""Progress bars with items/s and ETA on every long loop (rich when attached to a terminal, tqdm-like text otherwise)."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("leccr.runtime.progress")


class _Bar:
    """A minimal progress reporter: a rich bar on a TTY, periodic log lines elsewhere (CI, Prefect workers)."""

    def __init__(self, total: int, desc: str, unit: str, logger=None, rich_progress=None, task_id=None):
        self.log = logger or log
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.skipped = 0  # items already finished (resumed shards, other workers' shards): not in the rate
        self.started = time.perf_counter()
        self._last_log = self.started
        self._rich, self._task = rich_progress, task_id
        self.extra = ""

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0

    def set_postfix(self, text: str) -> None:
        """Extra live figures (e.g. tokens/s) shown beside items/s."""
        self.extra = text

    def skip(self, n: int) -> None:
        """Count `n` items that were already done: they advance the bar but not the rate or the ETA."""
        if n <= 0:
            return
        self.skipped += n
        if self._rich is not None:  # reset: rich's own speed and ETA must not count these either
            self.done += n
            self._rich.reset(self._task, completed=self.done, extra=self.extra, rate=f"{self.rate:.1f} {self.unit}/s")
            return
        self.update(n)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, advance=n, extra=self.extra, rate=f"{self.rate:.1f} {self.unit}/s")
            return
        now = time.perf_counter()
        if now - self._last_log >= 10 or self.done >= self.total:
            self._last_log = now
            eta = (self.total - self.done) / self.rate if self.rate > 0 else float("nan")
            self.log.info("%s: %d/%d %s (%.1f %s/s, ETA %.0fs) %s", self.desc, self.done, self.total,
                     self.unit, self.rate, self.unit, eta, self.extra)


@contextmanager
def progress(total: int, desc: str, unit: str = "items", logger=None) -> Iterator[_Bar]:
    """A bar on a terminal; otherwise a log line every 10 s (to `logger`, e.g. Prefect's run logger)."""
    if sys.stderr.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
        with Progress(*columns, transient=False) as rich_progress:
            task = rich_progress.add_task(desc, total=total, extra="", rate="")
            bar = _Bar(total, desc, unit, logger, rich_progress, task)
            yield bar
    else:
        bar = _Bar(total, desc, unit, logger)
        yield bar
