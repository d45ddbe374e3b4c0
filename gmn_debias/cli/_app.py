"""The typer application object every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gmn-debias",
    help=(
        "Debias a trained PyTorch classifier with GroupMixNorm (fit), and measure group "
        "fairness with release gates for CI (audit).\n\n"
        "Exit codes: 0 ok / gates pass, 1 a gate failed, 2 bad usage or input, "
        "3 a gated metric is undefined."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
