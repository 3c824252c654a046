"""The argument parser of the graft-* commands: argparse, with a mistake in one line.

argparse prints its usage block and then the error; the house rule is one line on stderr,
`PROGRAM: error: ...`, exit code 2. `--help` / `-h` still print the full usage and exit 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from graft.common.errors import EXIT_USER_ERROR


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (subcommands included) whose errors are one line naming the program."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --tune is not --tuned
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        program = self.prog.split()[0]  # "graft-static derive" -> "graft-static"
        message = " ".join(message.split())  # one line, whatever argparse wrapped
        print(f"{program}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
