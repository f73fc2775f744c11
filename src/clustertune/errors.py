"""User-facing errors: one sentence naming the input and the fix, raised before compute is spent."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from clustertune.stop import EXIT_USER_ERROR, STATUS_USER_ERROR, write_status


class UserError(Exception):
    """A mistake in the user's config or data. The message is the whole explanation."""


F = TypeVar("F", bound=Callable[..., object])


# How long a rank other than the main one waits before reporting a user error itself. Every
# rank checks the same inputs, so the main process normally fails the same way within this
# time: torchrun then ends this rank (SIGTERM), and the line is printed once. Only an error
# that the main process does not hit (a file one node cannot read) waits it out, and is then
# reported by this rank, so no user error ever ends without its line.
MAIN_PROCESS_GRACE_S = 5.0


def is_main_process() -> bool:
    """Global rank 0, or no launcher. From torchrun's RANK, as accelerate reads it: a user
    error can be raised before any process group (or Accelerator) exists."""
    return os.environ.get("RANK", "0") == "0"


def exit_on_user_error(main: F) -> F:
    """Turn a UserError into one line on stderr (once, from the main process) and exit code 2,
    without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            write_status(STATUS_USER_ERROR)  # clustertune-launch then exits 2, not torchrun's 1
            if not is_main_process():
                # torchrun's SIGTERM must end this wait at once (a stop handler may be set).
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(MAIN_PROCESS_GRACE_S)
            print(f"clustertune: error: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
