"""The loss curve of a run (training and validation, from its metrics.jsonl) drawn as a PNG (`ember plot`)."""

from __future__ import annotations

import json
from pathlib import Path

from ember.errors import EmberError


def read_curves(metrics_jsonl: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training loss points, validation loss points) as (iteration, loss) pairs."""
    train, valid = [], []
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise EmberError(f"{path} does not exist; ember train writes it under SAVE_DIR/logs/metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise EmberError(f"{path}:{line_no}: not a JSON object") from None
            if row.get("loss") is not None:
                train.append((row["iteration"], row["loss"]))
            if row.get("eval_loss") is not None:
                valid.append((row["iteration"], row["eval_loss"]))
    return train, valid


def plot_loss_curve(metrics_jsonl: str | Path, png: str | Path, title: str = "ember: loss") -> Path:
    """Draw both curves into `png` (written atomically); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    train, valid = read_curves(metrics_jsonl)
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
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png
