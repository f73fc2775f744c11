"""User-facing errors: one sentence naming the input and the fix, raised before compute is spent."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from clustertune.stop import EXIT_USER_ERROR, STATUS_USER_ERROR, write_status


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
            write_status(STATUS_USER_ERROR)  # clustertune-launch then exits 2, not torchrun's 1
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
