"""Errors a user can fix, and the exit codes the CLI maps them to.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback (without local variables).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNDEFINED = 3


class UserError(Exception):
    """Bad usage or bad input: the message is shown to the user as one line."""

    exit_code = EXIT_BAD_INPUT
