"""The loss curve of a run (training and validation, from its metrics.jsonl) drawn as a PNG (`ember plot`)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from ember.errors import EmberError


def _point(row, key: str) -> tuple[int, float] | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(row.get("iteration"), int) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} without a numeric iteration and value")
    return row["iteration"], float(value)


def read_curves(metrics_jsonl: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[int]]:
    """(training loss points, validation loss points) as (iteration, loss) pairs, and the numbers
    of the lines that could not be read (skipped: a run killed mid-write leaves half a line)."""
    train, valid, bad = [], [], []
    path = Path(metrics_jsonl)
    if path.is_dir():
        raise EmberError(f"{path} is a folder; give its logs/metrics.jsonl")
    if not path.is_file():
        raise EmberError(f"{path} does not exist; ember train writes it under SAVE_DIR/logs/metrics.jsonl")
    try:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                    points = _point(row, "loss"), _point(row, "eval_loss")
                except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    bad.append(line_no)
                    continue
                if points[0] is not None:
                    train.append(points[0])
                if points[1] is not None:
                    valid.append(points[1])
    except OSError as err:
        raise EmberError(f"cannot read {path}: {err.strerror or err}") from None
    return train, valid, bad


def plot_loss_curve(metrics_jsonl: str | Path, png: str | Path, title: str = "ember: loss") -> Path:
    """Draw both curves into `png` (written atomically); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    train, valid, bad = read_curves(metrics_jsonl)
    if bad:
        print(f"skipped {len(bad)} unreadable line(s) of {metrics_jsonl} (first: line {bad[0]})", file=sys.stderr)
    if not train and not valid:
        raise EmberError(f"{metrics_jsonl} has no loss values to plot yet")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:orange")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", color="tab:blue")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(png.stem + ".tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(png)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise EmberError(f"cannot write --output {png}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return png
