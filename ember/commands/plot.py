"""`ember plot METRICS.jsonl`: the loss curve of a run (training and validation) as a PNG."""

from __future__ import annotations

from ember.train.plot import plot_loss_curve


def add_arguments(parser) -> None:
    parser.add_argument("metrics", help="a run's logs/metrics.jsonl")
    parser.add_argument("--output", default="loss.png", help="PNG file to write")
    parser.add_argument("--title", default="ember: loss")


def run(args) -> int:
    out = plot_loss_curve(args.metrics, args.output, args.title)
    print(f"wrote {out}")
    return 0
