"""``gmn-debias fit``: debias a checkpoint with GroupMixNorm and write checkpoint + report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from ..errors import UserError
from ..finetune import TARGET_METRIC, EpochResult, Setting
from ..fit import FitConfig, run_fit, settings_grid
from ..fit_report import levelling_sentence, selection_sentence
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


def _split_list(values: list[str] | None) -> list[str]:
    """Accept repeated flags and comma-separated values alike."""
    return [part.strip() for v in values or [] for part in str(v).split(",") if part.strip()]


def _floats(values: list[str] | None, flag: str) -> list[float] | None:
    items = _split_list(values)
    if not items:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise UserError(f"{flag} takes numbers, got {', '.join(items)}") from None


class _Progress:
    """A tqdm bar on a terminal; one plain line per epoch in CI logs; nothing when quiet."""

    def __init__(self, total: int, quiet: bool, target: str) -> None:
        self.quiet, self.key = quiet, TARGET_METRIC[target]
        self.label = {"dp": "DP", "eo": "EO", "eod": "EOD"}[target]
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="fine-tuning", unit="epoch", disable=quiet or not tty, leave=False)
        self.lines = not quiet and not tty

    def __call__(self, setting: Setting, result: EpochResult) -> None:
        m = result.metrics["metrics"]
        gap, ap = m.get(self.key), m.get("average_precision")
        text = (f"setting {result.setting} epoch {result.epoch}/{setting.epochs}: loss {result.train_loss:.4f}, "
                f"val {self.label} {'undefined' if gap is None else f'{gap:.3f}'}, "
                f"AP {'undefined' if ap is None else f'{ap:.3f}'}")
        self.bar.set_postfix_str(text.split(": ", 1)[1])
        self.bar.update(1)
        if self.lines:
            typer.echo(text, err=True)

    def close(self) -> None:
        self.bar.close()


@app.command()
@cli_errors
def fit(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .safetensors, .pt/.pth state_dict (with --arch) or trusted pickle.", dir_okay=False)],
    data: Annotated[Path, typer.Argument(help="Labelled CSV/Parquet with raw feature columns, the label and the protected column(s).", dir_okay=False)],
    protected: Annotated[Optional[list[str]], typer.Option("--protected", "-p", help="Protected column; repeat for intersectional groups.", rich_help_panel="Data")] = None,
    label: Annotated[Optional[str], typer.Option(help="Label column (default: the one in the model's schema).", rich_help_panel="Data")] = None,
    positive: Annotated[Optional[str], typer.Option(help="Label value of the positive class (default: the schema's; 0/1, -1/1, True/False need none).", rich_help_panel="Data")] = None,
    eval: Annotated[Optional[Path], typer.Option("--eval", help="Held-out labelled file for the before/after report (default: the validation part).", dir_okay=False, rich_help_panel="Data")] = None,
    val: Annotated[Optional[Path], typer.Option("--val", help="Validation file that picks the epoch/setting (default: a stratified split of DATA).", dir_okay=False, rich_help_panel="Data")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: MODEL's folder / <stem>-debiased).", file_okay=False, rich_help_panel="Output")] = None,
    target: Annotated[str, typer.Option(help="Gap to lower: dp (demographic parity), eo (equal opportunity, TPR gap) or eod (equalized odds).", rich_help_panel="Search")] = "dp",
    max_ap_drop: Annotated[float, typer.Option(help="Largest validation AP loss accepted versus the input model.", rich_help_panel="Search")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed for the split, shuffling and mixing (CPU runs are repeatable).", rich_help_panel="Search")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.", rich_help_panel="Search")] = "auto",
    layers: Annotated[Optional[list[str]], typer.Option("--layers", help="Layer name(s) to attach GroupMixNorm to (see `gmn-debias layers`); default: every foldable hidden layer.", rich_help_panel="Search")] = None,
    alpha: Annotated[Optional[list[str]], typer.Option("--alpha", help="Beta(α, α) mixing parameter(s) to try, e.g. 0.5 or 0.1,0.5. Default: 0.5.", rich_help_panel="Search")] = None,
    lr: Annotated[Optional[list[str]], typer.Option("--lr", help="Learning rate(s) to try. Default: 1e-4.", rich_help_panel="Search")] = None,
    gap_penalty: Annotated[Optional[list[str]], typer.Option("--gap-penalty", help="Weight(s) of a soft-score gap penalty on the shipped model (GapReg), tried as extra settings; 0 = GroupMixNorm alone. Default: 0,20 for --target dp, 0 otherwise.", rich_help_panel="Search")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per setting; the best epoch is chosen on validation. Default: 8.", rich_help_panel="Search")] = None,
    inference: Annotated[Optional[str], typer.Option(help="GroupMixNorm at inference: running (least-squares fit of the training map, folded) or identity. Default: running.", rich_help_panel="Search")] = None,
    stats_only: Annotated[bool, typer.Option(help="Also try a candidate that only updates GroupMixNorm's running statistics (learning rate 0).", rich_help_panel="Search")] = True,
    batch_size: Annotated[int, typer.Option(min=2, help="Rows per training batch.", rich_help_panel="Search")] = 256,
    val_fraction: Annotated[float, typer.Option(help="Share of DATA held out for validation when --val is not given.", rich_help_panel="Search")] = 0.3,
    threshold: Annotated[float, typer.Option(help="Decision threshold on the positive-class probability.", rich_help_panel="Data")] = 0.5,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for fine-tuning (default: 1 for models under 1M parameters, else torch's default).", rich_help_panel="Search")] = None,
    max_selection_drop: Annotated[Optional[float], typer.Option(help="Refuse candidates whose validation selection rate fell by more than this share of the input model's (e.g. 0.1), so a gap is not closed by selecting fewer people (levelling down). Default: no limit.", rich_help_panel="Search")] = None,
    force: Annotated[bool, typer.Option(help="When no candidate keeps AP within budget, take the smallest gap anyway.", rich_help_panel="Search")] = False,
    train_batchnorm: Annotated[bool, typer.Option(help="Let the model's BatchNorm layers update their statistics (default: frozen).", rich_help_panel="Search")] = False,
    missing_groups: Annotated[str, typer.Option(help="Empty protected cells: error, drop (the rows) or group (a '<missing>' group).", rich_help_panel="Data")] = "error",
    normalize_labels: Annotated[bool, typer.Option(help="Strip spaces and a trailing '.' from labels (Adult's test file: '>50K.').", rich_help_panel="Data")] = False,
    strict: Annotated[bool, typer.Option(help="Unseen category values are an error (default: zeros and a warning with the count).", rich_help_panel="Data")] = False,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_checkpoint: TrustOpt = False,
    schema: SchemaOpt = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Debias MODEL with GroupMixNorm, fine-tuned on DATA; write a checkpoint and a report.

    Tries a small grid of settings, picks the epoch and setting with the smallest targeted gap on validation data whose AP stays within --max-ap-drop of the input model's, folds GroupMixNorm into the weights (same architecture and keys; no protected attribute needed at inference), and writes OUT/<model>.debiased.safetensors, report.json, report.md and config.yaml. Nothing is written if the run fails or is interrupted.

    Example: gmn-debias fit sample_models/adult_mlp.safetensors sample_models/adult_finetune.csv --protected sex --eval sample_models/adult_holdout.csv --out adult-debiased
    """
    setup_logging(quiet)
    if not protected:
        raise UserError("--protected COLUMN is required (the attribute whose groups should be treated alike)")
    cfg = FitConfig(
        model=model, data=data, protected=list(protected), label=label, positive=positive, eval=eval, val=val,
        out=out, target=target, max_ap_drop=max_ap_drop, seed=seed, device=device,
        layers=_split_list(layers) or ["auto"], epochs=epochs, batch_size=batch_size, val_fraction=val_fraction,
        inference=inference, stats_only=stats_only, threshold=threshold, threads=threads, force=force, max_selection_drop=max_selection_drop, train_batchnorm=train_batchnorm,
        arch=arch, arch_kwargs=arch_kwargs, trust_checkpoint=trust_checkpoint, schema=schema,
        missing_groups=missing_groups, normalize_labels=normalize_labels, strict=strict,
        config=config,
    )
    cfg.alpha, cfg.lr = _floats(alpha, "--alpha"), _floats(lr, "--lr")
    cfg.gap_penalty = _floats(gap_penalty, "--gap-penalty")
    resolved = cfg.resolved()
    total = sum(s.epochs for s in settings_grid(resolved, ["?"]))
    progress = _Progress(total, quiet, resolved.target)
    try:
        outcome = run_fit(cfg, on_epoch=progress)
    finally:
        progress.close()
    report = outcome.report
    typer.echo(report["verdict"])
    typer.echo(selection_sentence(report))
    caution = levelling_sentence(report)
    if caution:
        typer.echo(caution)
    for path in outcome.files:
        typer.echo(f"wrote {path}")
