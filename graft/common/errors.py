"""How the trainer ends on a mistake or a failure, and with which exit code."""

from __future__ import annotations

import sys
from typing import NoReturn

# Exit codes: a user mistake (bad config, missing data) is 2; a run that failed (a
# non-finite loss) is 1, after it has kept its last good checkpoint and recorded why.
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class UserError(Exception):
    """A mistake the user fixes in the config or on the command line; one line, no traceback."""


class RunDirTaken(UserError):
    """The run directory holds another run (another config) or is in use by another job:
    refused without touching any of its files."""


def exit_with(program: str, error: Exception) -> NoReturn:
    """End a command on a user mistake: one line on stderr, exit code 2."""
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


class NonFiniteLoss(Exception):
    """The training loss (or the weights after a step) became NaN or infinite at `step`."""

    def __init__(self, step: int, what: str = "training loss") -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.step = step
