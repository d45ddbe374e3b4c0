"""Pieces every command shares: error handling, YAML config, logging, loading options."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
import yaml

from ..errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(func: F) -> F:
    """Turn a :class:`UserError` into one stderr line and its exit code.

    Only our own error type is caught: typer's ``Exit``/usage errors pass through untouched,
    and a real bug keeps its traceback (the app hides local variables).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def setup_logging(quiet: bool = False) -> None:
    """Route the library's warnings to stderr as ``warning: ...`` lines."""
    logger = logging.getLogger("gmn_debias")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def load_config(path: Path) -> dict[str, Any]:
    """Read a YAML config into click's ``default_map`` shape (keys use underscores).

    A nested ``gates:`` block is flattened (``gates: {max_dp: 0.05}`` → ``max_dp``), and a
    mapping given for ``arch_kwargs`` is JSON-encoded, as the flag expects JSON text.
    """
    import json

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{path} is not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of option names to values")
    flat: dict[str, Any] = {str(k).replace("-", "_"): v for k, v in raw.items() if k != "gates"}
    if "gates" in raw:
        gates = raw["gates"]
        if not isinstance(gates, dict):
            raise typer.BadParameter(f"{path}: 'gates:' must be a mapping such as {{max_dp: 0.1}}")
        for key, value in gates.items():
            name = str(key).replace("-", "_")
            if name in flat:
                raise typer.BadParameter(f"{path}: {name} is given both under 'gates:' and at the top level")
            flat[name] = value
    if isinstance(flat.get("arch_kwargs"), dict):
        flat["arch_kwargs"] = json.dumps(flat["arch_kwargs"])
    for key in ("protected", "layers"):
        if isinstance(flat.get(key), str):
            flat[key] = [flat[key]]
    return flat


def _config_callback(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    if value is not None:
        config = load_config(value)
        known = {p.name for p in ctx.command.params}
        unknown = sorted(set(config) - known)
        if unknown:
            raise typer.BadParameter(f"unknown option(s) in {value}: {', '.join(unknown)}")
        ctx.default_map = {**(ctx.default_map or {}), **config}
    return value


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="YAML file of options (keys as the flags, '-' or '_'); flags on the command line win.",
        is_eager=True,
        callback=_config_callback,
        exists=True,
        dir_okay=False,
    ),
]
ArchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="Architecture for a bare state_dict: 'package.module:factory' (called with --arch-kwargs).",
    ),
]
ArchKwargsOpt = Annotated[
    Optional[str],
    typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch, e.g. '{\"in_dim\": 8}'."),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow unpickling arbitrary objects from a .pt file. Only for files you trust: "
        "unpickling can run code.",
    ),
]
SchemaOpt = Annotated[
    Optional[Path],
    typer.Option("--schema", help="YAML feature schema (overrides the one stored in the checkpoint).", dir_okay=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no info lines.")]
