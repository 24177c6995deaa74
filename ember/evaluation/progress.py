"""A one-line progress report on stderr: done/total, items/s and ETA, redrawn in place."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """`update(n)` after each batch; `close()` ends the line. Redraws at most every `every`
    seconds, so a fast loop does not spend its time printing."""

    def __init__(self, label: str, total: int | None, unit: str = "items", out=None, every: float = 0.5):
        self.label, self.total, self.unit = label, total, unit
        self.out = out or sys.stderr
        self._terminal = bool(getattr(self.out, "isatty", lambda: False)())
        self.every = every if self._terminal else max(every, 10.0)
        self.done = 0
        self.started = time.perf_counter()
        self._drawn = 0.0 if self._terminal else self.started

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        text += f"  {rate:.1f} {self.unit}/s"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f"  ETA {_clock(eta) if eta != float('inf') else '?'}"
        text += f"  elapsed {_clock(elapsed)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._drawn >= self.every:
            self._drawn = now
            self._write()

    def close(self) -> None:
        self._write(end=True)

    def _write(self, end: bool = False) -> None:
        # a terminal redraws one line; a log file gets whole lines, fewer of them
        if self._terminal:
            self.out.write("\r" + self.line() + ("\n" if end else ""))
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()
