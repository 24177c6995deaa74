"""ember's subcommands: one thin module each, exposing `add_arguments(parser)` and `run(args) -> int | None`.

The command layer sits above everything else (only `ember.cli` is above it): a command reads its
flags, chooses which formats and steps a run needs, and calls the library. Modules are imported
only when their subcommand runs, so `ember preprocess` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help). Nested groups (`ember data inspect`) use a dict.
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "demo": ("ember.commands.demo", "run the built-in small default end to end (corpus, tokenizer, data, ...)"),
    "preprocess": ("ember.commands.preprocess", "tokenize text files into Megatron .bin/.idx datasets"),
    "launch": ("ember.commands.launch",
               "start training on this node with torchrun (GPUS_PER_NODE, NNODES, NODE_RANK, ...)"),
    "train": ("ember.commands.train", "pretrain or fine-tune (Megatron-style flags, YAML config, torchrun)"),
    "convert": ("ember.commands.convert", "convert weights between Hugging Face, Megatron and ember folders"),
    "generate": ("ember.commands.generate", "generate text from an ember weight folder (greedy or sampled, KV cache)"),
    # evaluation (H6): perplexity and lm-evaluation-harness benchmarks
    "eval": ("ember.commands.eval", "evaluate a checkpoint: perplexity on a dataset, lm-eval benchmark accuracy"),
    "models": ("ember.commands.models", "list the named models (family, size, source) that --model accepts"),
    "plot": ("ember.commands.plot", "plot a run's loss curve (logs/metrics.jsonl) to a PNG"),
    "tiny": ("ember.commands.tiny",
             "prepare the EMBER_TINY assets (built-in corpus, tiny tokenizer, datasets); print paths"),
    "plan": ("ember.commands.plan", "estimate memory and communication per device; check or search parallel layouts"),
    "tokenizer": {
        "train": ("ember.commands.tokenizer_train", "train a byte-level BPE tokenizer on a corpus"),
    },
    "data": {
        "inspect": ("ember.commands.data_inspect", "summarise an indexed dataset and decode its first documents"),
        "corpus": ("ember.commands.data_corpus", "write the built-in corpus (text from the Python install) as jsonl"),
        "samples": ("ember.commands.data_samples",
                    "print a run's first training samples and a sha256 to compare tools"),
    },
}


def _add_command(subparsers, name: str, module: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    mod = importlib.import_module(module)
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Pretrain and fine-tune large language models.")
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


def run_command(argv: list[str]) -> int:
    """Parse `argv` (without the program name) and run its subcommand; `EmberError` propagates.
    The `ember` entry point (`ember.cli`) and in-process stages (`ember demo`) both come here."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    return int(run(args) or 0)
