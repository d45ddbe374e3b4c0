"""``gmn-debias audit``: fairness metrics on labelled data, and release gates for CI."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..audit import AuditOptions, audit_model_file, audit_scores_file
from ..errors import UserError
from ..files import atomic_write_texts, ensure_not_input, ensure_writable_dir
from ..gates import build_gates, evaluate_gates, exit_code
from ..report import (
    audit_document,
    render_junit,
    render_markdown,
    render_table,
    to_json,
)
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


class ScoreTypeChoice(str, Enum):
    probability = "probability"
    logit = "logit"
    label = "label"


class MethodChoice(str, Enum):
    between_groups = "between_groups"
    to_overall = "to_overall"


class AggChoice(str, Enum):
    worst_case = "worst_case"
    mean = "mean"


class OnUndefinedChoice(str, Enum):
    error = "error"
    pass_ = "pass"
    fail = "fail"


class MissingChoice(str, Enum):
    error = "error"
    drop = "drop"
    group = "group"


def _gate(help_text: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, rich_help_panel="Gates (exit 1 when one fails)")


_OUT = "Outputs"


@app.command()
@cli_errors
def audit(
    model: Annotated[Optional[Path], typer.Argument(help="Checkpoint to score DATA with (omit with --scores).", dir_okay=False)] = None,
    data: Annotated[Optional[Path], typer.Argument(help="Labelled CSV/Parquet with the model's raw feature columns.", dir_okay=False)] = None,
    scores: Annotated[Optional[Path], typer.Option("--scores", help="Labelled CSV/Parquet that already holds scores or predictions (instead of MODEL DATA).", dir_okay=False)] = None,
    score_col: Annotated[Optional[str], typer.Option("--score-col", help="Column of --scores with the score, probability, logit or 0/1 prediction.")] = None,
    score_type: Annotated[Optional[ScoreTypeChoice], typer.Option("--score-type", help="How to read --score-col; default: decided once from the whole column (all 0/1: label; within [0, 1]: probability; else logit).")] = None,
    protected: Annotated[Optional[list[str]], typer.Option("--protected", "-p", help="Protected column; repeat for intersectional groups (labels joined by '|').")] = None,
    label: Annotated[Optional[str], typer.Option(help="Label column (default: the one in the model's schema).")] = None,
    positive: Annotated[Optional[str], typer.Option(help="Label value of the positive class (0/1, -1/1, True/False need none).")] = None,
    weight: Annotated[Optional[str], typer.Option(help="Column of sample weights, applied to every rate (negative or missing: error).")] = None,
    threshold: Annotated[float, typer.Option(help="A row is selected when its probability >= this (logits: logit >= log(t/(1-t))).")] = 0.5,
    method: Annotated[MethodChoice, typer.Option(help="Gaps between groups (max - min) or to the overall rate (fairlearn's names).")] = MethodChoice.between_groups,
    agg: Annotated[AggChoice, typer.Option(help="Equalized odds: worst of the TPR and FPR gaps, or their mean.")] = AggChoice.worst_case,
    min_group_size: Annotated[Optional[int], typer.Option(help="Flag groups with fewer rows than this in the report.")] = None,
    missing_groups: Annotated[MissingChoice, typer.Option(help="Empty protected cells: error, drop (the rows) or group (a '<missing>' group).")] = MissingChoice.error,
    normalize_labels: Annotated[bool, typer.Option(help="Strip spaces and a trailing '.' from labels (Adult's test file: '>50K.').")] = False,
    strict: Annotated[bool, typer.Option(help="Unseen category values are an error (default: zeros and a warning with the count).")] = False,
    positive_index: Annotated[Optional[int], typer.Option(help="Output column of the positive class for a model with several outputs.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Rows read at a time (memory bound). With --scores results are identical for any value; with a model, float32 scores may differ in the last bits.")] = 65_536,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward pass.")] = 8192,
    max_dp: Annotated[Optional[float], _gate("Largest demographic_parity_difference allowed.")] = None,
    min_dp_ratio: Annotated[Optional[float], _gate("Smallest demographic_parity_ratio allowed.")] = None,
    max_eo: Annotated[Optional[float], _gate("Largest equal_opportunity_difference (TPR gap) allowed.")] = None,
    max_eod: Annotated[Optional[float], _gate("Largest equalized_odds_difference allowed.")] = None,
    min_eod_ratio: Annotated[Optional[float], _gate("Smallest equalized_odds_ratio allowed.")] = None,
    max_score_gap: Annotated[Optional[float], _gate("Largest mean_score_difference (soft demographic-parity gap) allowed.")] = None,
    min_accuracy: Annotated[Optional[float], _gate("Smallest accuracy allowed.")] = None,
    min_ap: Annotated[Optional[float], _gate("Smallest average_precision allowed.")] = None,
    min_auc: Annotated[Optional[float], _gate("Smallest roc_auc allowed.")] = None,
    on_undefined: Annotated[OnUndefinedChoice, typer.Option(help="A gated metric that is undefined: error (exit 3), pass, or fail (exit 1).", rich_help_panel="Gates (exit 1 when one fails)")] = OnUndefinedChoice.error,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the audit and gate results as JSON.", dir_okay=False, rich_help_panel=_OUT)] = None,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Write a Markdown report.", dir_okay=False, rich_help_panel=_OUT)] = None,
    junit_out: Annotated[Optional[Path], typer.Option("--junit", help="Write JUnit XML, one testcase per gate.", dir_okay=False, rich_help_panel=_OUT)] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    schema: SchemaOpt = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Measure group fairness and accuracy of MODEL on DATA (or of a scores file), and check release gates: exit 0 all pass, 1 a gate failed, 2 bad input, 3 a gated metric is undefined.

    Examples: gmn-debias audit model.safetensors holdout.csv -p sex --max-dp 0.1 --junit gates.xml; gmn-debias audit --scores preds.csv --score-col p --label y -p sex --json audit.json
    """
    setup_logging(quiet)
    gates = build_gates({
        "max_dp": max_dp, "min_dp_ratio": min_dp_ratio, "max_eo": max_eo, "max_eod": max_eod,
        "min_eod_ratio": min_eod_ratio, "max_score_gap": max_score_gap, "min_accuracy": min_accuracy,
        "min_ap": min_ap, "min_auc": min_auc,
    })
    outputs = [p for p in (json_out, markdown_out, junit_out) if p is not None]
    inputs = [model, data, scores, config, schema]
    for out in outputs:
        ensure_not_input(out, inputs)
        ensure_writable_dir(out.parent)
    if len({p.resolve() for p in outputs}) < len(outputs):
        raise UserError("--json, --markdown and --junit must name different files")
    options = AuditOptions(
        protected=list(protected or []), label=label, positive=positive, weight=weight, threshold=threshold,
        method=method.value, agg=agg.value, min_group_size=min_group_size,  # type: ignore[arg-type]
        missing_groups=missing_groups.value, normalize_labels=normalize_labels, strict=strict,  # type: ignore[arg-type]
        chunk_size=chunk_size, progress=not quiet,
    )
    if scores is not None:
        if model is not None or data is not None:
            raise UserError("give either MODEL DATA or --scores FILE, not both")
        if score_col is None:
            raise UserError("--scores needs --score-col COLUMN (the column holding the scores)")
        result = audit_scores_file(scores, score_col, options, score_type=score_type.value if score_type else None)  # type: ignore[arg-type]
    else:
        if model is None or data is None:
            raise UserError("give MODEL DATA (a checkpoint and a labelled file), or --scores FILE --score-col COLUMN")
        if score_col is not None or score_type is not None:
            raise UserError("--score-col/--score-type apply to --scores only; a model's outputs are turned into probabilities")
        from ..checkpoint import load_model
        from ..schema import FeatureSchema

        loaded = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint)
        feature_schema = FeatureSchema.from_yaml(schema) if schema is not None else None
        result = audit_model_file(loaded, data, options, schema=feature_schema, positive_index=positive_index,
                                  batch_size=batch_size)
    results = evaluate_gates(result, gates, on_undefined.value)  # type: ignore[arg-type]
    document = audit_document(result, results, on_undefined.value)
    renderers = {json_out: lambda: to_json(document), markdown_out: lambda: render_markdown(result, results),
                 junit_out: lambda: render_junit(result, results)}
    atomic_write_texts({path: render() for path, render in renderers.items() if path is not None})
    typer.echo(render_table(result, results), nl=False)
    code = exit_code(results)
    if code:
        raise typer.Exit(code)
