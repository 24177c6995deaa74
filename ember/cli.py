"""The `ember` command: one entry point, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int | None`.
Modules are imported only when their subcommand runs, so `ember preprocess` never
pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ember.errors import EmberError

# name -> (module, one-line help). Nested groups (`ember data inspect`) use a dict.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "demo": ("ember.demo", "run the built-in small default end to end (corpus, tokenizer, data, ...)"),
    "preprocess": ("ember.data.preprocess", "tokenize text files into Megatron .bin/.idx datasets"),
    "launch": ("ember.launch", "start training on this node with torchrun (GPUS_PER_NODE, NNODES, NODE_RANK, ...)"),
    "train": ("ember.train.cli", "pretrain or fine-tune (Megatron-style flags, YAML config, torchrun)"),
    "convert": ("ember.models.convert", "convert weights between Hugging Face and ember folders"),
    "generate": ("ember.generate", "generate text from an ember weight folder (greedy or sampled, KV cache)"),
    "plot": ("ember.train.plot", "plot a run's loss curve (logs/metrics.jsonl) to a PNG"),
    "tiny": ("ember.tiny", "prepare the EMBER_TINY assets (built-in corpus, tiny tokenizer, datasets); print paths"),
    "plan": ("ember.parallel.plan", "estimate memory and communication per device; check or search parallel layouts"),
    "tokenizer": {
        "train": ("ember.data.tokenizer_train", "train a byte-level BPE tokenizer on a corpus"),
    },
    "data": {
        "inspect": ("ember.data.inspect", "summarise an indexed dataset and decode its first documents"),
        "corpus": ("ember.data.corpus", "write the built-in corpus (text from the Python install) as jsonl"),
        "samples": ("ember.data.samples_cmd", "print a run's first training samples and a sha256 to compare tools"),
    },
}


def _add_command(subparsers, name: str, module: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module the user asked for: keeps start-up fast and torch-free.
    wanted = argv[0] if argv else None
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            group = subparsers.add_parser(name, help=f"{name} subcommands")
            group_sub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            for sub, (module, help_text) in entry.items():
                if name == wanted and len(argv) > 1 and argv[1] == sub:
                    _add_command(group_sub, sub, module, help_text)
                else:
                    group_sub.add_parser(sub, help=help_text)
        elif name == wanted:
            _add_command(subparsers, name, *entry)
        else:
            subparsers.add_parser(name, help=entry[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except EmberError as err:
        print(f"ember {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ember {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
