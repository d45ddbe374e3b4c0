"""Command-line interface: ``gmn-debias fit | audit | layers``.

Each command lives in its own module and is a few calls into the library.
"""

from __future__ import annotations

import sys

import typer

from . import audit, fit, layers  # noqa: F401  (register the commands)
from ._app import app

try:  # typer vendors click from 0.2x on; older typer depends on click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException  # type: ignore[no-redef]


def main() -> None:
    """Console-script entry point.

    A usage error (bad option value, unknown YAML key, a folder given as a file) is one
    ``error:`` line and exit code 2, like every other bad input, instead of a boxed panel.
    """
    try:
        code = app(standalone_mode=False)
    except ClickException as exc:
        message = exc.format_message()
        if message:  # empty for "no arguments: here is the help"
            typer.echo(f"error: {message}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code or 0)
