"""Command-line interface: ``gmn-debias fit | audit | layers``.

Each command lives in its own module and is a few calls into the library.
"""

from __future__ import annotations

from . import audit, fit, layers  # noqa: F401  (register the commands)
from ._app import app


def main() -> None:
    """Console-script entry point."""
    app()
