"""``gmn-debias layers``: list a model's named layers so a user can pick injection points."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..checkpoint import load_model, model_input_width, require_eager
from ..data import input_width_for
from ..errors import UserError
from ..hooks import LayerInfo, candidate_layers
from ..schema import FeatureSchema
from ._app import app
from .common import (
    ArchKwargsOpt,
    ArchOpt,
    ConfigOpt,
    QuietOpt,
    SchemaOpt,
    TrustOpt,
    cli_errors,
    setup_logging,
)


def _shape(shape: tuple[int, ...] | None) -> str:
    """``(N, 64)``: the batch dimension of the probe batch is not the model's business."""
    if shape is None:
        return "?"
    return "(" + ", ".join(["N", *map(str, shape[1:])]) + ")"


def _table(infos: list[LayerInfo]) -> str:
    rows = [("layer", "type", "output", "GroupMixNorm", "note")]
    rows += [(i.name, i.type, _shape(i.out_shape), "yes" if i.foldable else "no", i.note) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(r[:4], widths)) + "  " + r[4]).rstrip() for r in rows)


@app.command()
@cli_errors
def layers(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth state_dict (with --arch) or trusted pickle.", dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    schema: SchemaOpt = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List MODEL's named layers with their types and output shapes, and mark the ones that can take GroupMixNorm and be folded back into the weights (pass them to fit --layers).

    Example: gmn-debias layers sample_models/adult_mlp.safetensors
    """
    setup_logging(quiet)
    loaded = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint)
    net = require_eager(loaded)
    feature_schema = FeatureSchema.from_yaml(schema) if schema is not None else loaded.schema
    width = input_width_for(feature_schema, model_input_width(net))
    sample = torch.zeros(2, width) if width else None  # a probe batch for the output shapes
    try:
        infos = candidate_layers(net, sample)
    except RuntimeError as exc:  # the probe forward: our guess of the input width was wrong
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{model}: a probe batch of {width} zero features failed ({first}); pass --schema FILE") from None
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    typer.echo(_table(infos))
    foldable = [i.name for i in infos if i.foldable]
    if foldable:
        typer.echo(f"\nGroupMixNorm can follow: {', '.join(foldable)}  (e.g. fit --layers {foldable[0]})")
    else:
        typer.echo("\nNo layer here can take GroupMixNorm and be folded (see the notes).")
