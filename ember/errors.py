"""The one exception type ember raises for bad input: the CLI prints it as one line, no traceback."""


class EmberError(Exception):
    """A user-facing error: say what is wrong, where, and how to fix it, in one line."""
