"""``python -m gmn_debias`` runs the CLI."""

from .cli import main

main()
