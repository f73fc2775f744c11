"""User-facing errors: one sentence naming the input and the fix, raised before compute is spent."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

# Exit codes a scheduler wrapper can act on (documented in README "Exit codes").
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad config or input: fix it, do not requeue
EXIT_REQUEUE = 75  # stopped on a signal after saving a checkpoint (EX_TEMPFAIL): requeue me


class UserError(Exception):
    """A mistake in the user's config or data. The message is the whole explanation."""


F = TypeVar("F", bound=Callable[..., object])


def exit_on_user_error(main: F) -> F:
    """Turn a UserError into one line on stderr and exit code 2, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"clustertune: error: {error}", file=sys.stderr, flush=True)
            status_file = os.environ.get("CLUSTERTUNE_STATUS_FILE")  # set by clustertune-launch
            if status_file:
                with open(status_file, "w") as handle:
                    handle.write("user_error\n")
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
