"""The project's own error type: a mistake of the user's (bad file, bad config), not a bug.

The entry points print such an error as one line and exit with code 2; anything else keeps its
traceback.
"""

from __future__ import annotations


class LingmaoError(Exception):
    """A user-facing error: the message says what is wrong and where (file:line or config key)."""

    exit_code = 2
