"""`ember tiny`: build the EMBER_TINY assets (built-in corpus, tiny tokenizer, datasets); print where they are."""

from __future__ import annotations

from ember.compat.tiny_assets import CACHE_ENV, prepare


def add_arguments(parser) -> None:
    parser.description = ("prepare the EMBER_TINY assets (built-in corpus, tiny tokenizer, datasets) "
                          "and print where they are")
    parser.add_argument("--shell", action="store_true",
                        help="print NAME=PATH lines for `eval \"$(ember tiny --shell)\"` in scripts")
    parser.add_argument("--cache-dir", default=None,
                        help=f"assets folder (default: ${CACHE_ENV} or ~/.cache/ember/tiny)")


def run(args) -> int:
    assets = prepare(args.cache_dir)
    if args.shell:
        print(assets.shell(), end="")
        return 0
    print(f"tiny assets in {assets.root}:")
    print(assets.shell(), end="")
    return 0
