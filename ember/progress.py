"""Rate and ETA of a long loop (an evaluation, a perplexity pass), reported now and then so that a
quarter-hour job is not a quarter hour of silence. Low in the layer order (just above
`ember.errors`), so that data, checkpoint, training and evaluation code can all report through it.

    progress = Progress("validation batches", total=100, emit=metrics.print, every=30)
    for batch in batches:
        ...
        progress.update()      # one more done; a line at most every `every` seconds
    progress.close()           # the final count (on a terminal, ends the redrawn line)

Without `emit`, lines go to stderr: redrawn in place on a terminal, whole lines (fewer of them)
in a log file.
"""

from __future__ import annotations

import sys
import time
from typing import Callable


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h05m, 14d02h."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


class Progress:
    def __init__(self, label: str, total: int | None = None, unit: str = "items",
                 emit: Callable[[str], None] | None = None, every: float = 30.0, final: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        """`final`: close() always reports the final count (else only after a loop long enough to
        have reported along the way: a quick one stays silent)."""
        self.label, self.total, self.unit, self.final = label, total, unit, final
        self.done = 0
        self._clock = clock
        self._terminal = emit is None and sys.stderr.isatty()
        self._emit = emit or self._to_stderr
        self.every = every if emit is not None or self._terminal else max(every, 10.0)
        self.started = self._last = clock()

    def line(self) -> str:
        elapsed = max(self._clock() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate) if rate > 0 else '?'}"
        return text + f", {duration(elapsed)} so far"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            self._emit(self.line())

    def close(self) -> None:
        if self.final or self._last > self.started:
            self._emit(self.line())
        if self._terminal:
            sys.stderr.write("\n")

    def _to_stderr(self, text: str) -> None:
        sys.stderr.write(("\r" + text) if self._terminal else (text + "\n"))
        sys.stderr.flush()
