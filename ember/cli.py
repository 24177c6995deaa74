"""The `ember` command: parse, run the subcommand, and turn `EmberError` (and an `OSError` on a path
the user gave) into one line (exit 2).

The subcommands and their modules are `ember.commands.COMMANDS`; each module is imported only when
its subcommand runs, so `ember preprocess` never pays for importing torch.
"""

from __future__ import annotations

import sys

from ember.commands import run_command
from ember.errors import EmberError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "ember"
    try:
        return run_command(argv)
    except EmberError as err:
        print(f"ember {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave: missing, a file for a folder, no space, no permission
        where = f": {err.filename}" if err.filename else ""
        print(f"ember {command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ember {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
