"""The project's own error type: a mistake of the user's (bad file, bad config), not a bug.

The entry points print such an error as one line and exit with code 2; anything else keeps its
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class LingmaoError(Exception):
    """A user-facing error: the message says what is wrong and where (file:line or config key)."""

    exit_code = 2


def traceback_wanted() -> bool:
    """`HYDRA_FULL_ERROR=1` asks for full tracebacks of user errors too."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def exit_on_user_error(debug: bool = False) -> Iterator[None]:
    """Turn a `LingmaoError` into one `error: ...` line on stderr and exit code 2.

    `debug=True` or HYDRA_FULL_ERROR=1 keep the traceback; other exceptions (bugs) always do.
    """
    try:
        yield
    except LingmaoError as exc:
        if debug or traceback_wanted():
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
