"""The one exception type for user-facing errors, and the wrapper that turns it into a message."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user (a flag, a file, a checkpoint): the message says what, where, and what was expected."""


def main_guard(fn):
    """Decorate a script's main(): a UserError prints one line to stderr and exits 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
