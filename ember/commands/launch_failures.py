"""The last line of a failed `ember launch`: which rank to blame and, from its own log, why.

torchelastic reports a failed run as a table of every rank it stopped, most of them stopped by
the launcher itself; what the user needs is the one rank that failed first and its own error
line, read back from `LOG_DIR/worker_<rank>*.log`.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from ember.commands.launch_plan import LaunchPlan


def rank_error(log_dir: str, rank: int) -> str | None:
    """The one-line reason in a failed rank's newest log: its `ember ...: error:` line, else the
    last line of its traceback."""
    logs = sorted(Path(log_dir).glob(f"worker_{rank}*.log"), key=lambda path: path.stat().st_mtime)
    if not logs:
        return None
    with open(logs[-1], "rb") as log:  # the end is enough, and a long run's log is long
        log.seek(max(log.seek(0, os.SEEK_END) - 64 * 1024, 0))
        tail = log.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        found = re.search(r"ember [\w-]+: error: (.*)", line)
        if found:
            return found.group(1)
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return None


def failure_summary(plan: LaunchPlan, failures: dict) -> str:
    """`rank R (exit C) failed: REASON; see LOG` for the rank whose failure stopped the run.

    When one rank fails, torchelastic stops the others with SIGTERM and lists them as failed too;
    the rank to blame is one that ended by itself (or by another signal: the OOM killer's SIGKILL),
    and among those, one that said why. Other such ranks are named after it."""
    def reason(rank: int, exitcode: int) -> str | None:
        said = rank_error(plan.log_dir, rank)
        if said is None and exitcode < 0:
            try:
                return f"killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                return None
        return said

    stopped = -int(signal.SIGTERM)
    own = {rank: failure for rank, failure in failures.items() if failure.exitcode != stopped} or failures
    reasons = {rank: reason(rank, failure.exitcode) for rank, failure in own.items()}
    first = min(own, key=lambda rank: (reasons[rank] is None, rank))
    others = sorted(rank for rank in own if rank != first)
    also = ""
    if others:
        named = ", ".join(str(rank) for rank in others[:4])
        named += f" and {len(others) - 4} more" if len(others) > 4 else ""
        also = f" (rank{'s' if len(others) > 1 else ''} {named} failed too)"
    said = f": {reasons[first]}" if reasons[first] else ""
    return f"rank {first} (exit {own[first].exitcode}) failed{said}{also}; see {plan.log_dir}/worker_{first}*.log"
