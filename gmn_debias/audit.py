"""Audit a labelled file, streamed in chunks, with a model or with a column of scores.

Memory stays bounded by the chunk size plus the per-group sums and the scores that exact
AP/ROC AUC need, so files larger than memory can be audited; the result is the same for
any chunk size (see :mod:`gmn_debias.metrics`).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import MissingGroups, iter_frames, iter_labelled
from .errors import UserError
from .metrics import SCORE_TYPES, Agg, FairnessAccumulator, Method, ScoreType
from .schema import FeatureSchema, numeric_values

PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar for files of 32 MiB and more


@dataclass(frozen=True)
class AuditOptions:
    """How rows are read and judged; shared by the model and the scores modes."""

    protected: Sequence[str]
    label: str | None = None
    positive: str | None = None
    weight: str | None = None
    threshold: float = 0.5
    method: Method = "between_groups"
    agg: Agg = "worst_case"
    min_group_size: int | None = None
    missing_groups: MissingGroups = "error"
    normalize_labels: bool = False
    strict: bool = False
    chunk_size: int = 65_536
    progress: bool = False


def _accumulator(options: AuditOptions, score_type: str | None) -> FairnessAccumulator:
    _validate(options)
    return FairnessAccumulator(
        threshold=options.threshold, score_type=score_type, method=options.method, agg=options.agg,  # type: ignore[arg-type]
        min_group_size=options.min_group_size, protected=list(options.protected),
    )


def _validate(options: AuditOptions) -> None:
    """Option errors first, before any file is read."""
    if not options.protected:
        raise UserError("--protected COLUMN is required (the attribute whose groups are compared)")
    if options.chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {options.chunk_size}")
    if options.min_group_size is not None and options.min_group_size < 1:
        raise UserError(f"--min-group-size must be at least 1, got {options.min_group_size}")
    if not 0.0 <= options.threshold <= 1.0:
        raise UserError(f"--threshold must lie in [0, 1] (a probability), got {options.threshold}")


def _bar(path: Path, enabled: bool) -> Any:
    """A tqdm row counter on a terminal for large files; None otherwise (CI logs stay clean)."""
    if not enabled or not sys.stderr.isatty() or os.path.getsize(path) < PROGRESS_MIN_BYTES:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"auditing {path.name}", unit=" rows", unit_scale=True, leave=False)


def _consume(acc: FairnessAccumulator, chunks: Iterable[tuple[Any, np.ndarray]], path: Path, progress: bool) -> dict[str, Any]:
    """Feed (LabelledData, scores) chunks into the accumulator; the audit object at the end."""
    bar = _bar(path, progress)
    try:
        for data, scores in chunks:
            acc.update(data.y.numpy(), scores, data.groups, data.weights)
            if bar is not None:
                bar.update(data.n_rows)
    finally:
        if bar is not None:
            bar.close()
    return acc.compute()


def scan_score_type(path: str | os.PathLike[str], score_col: str, chunk_size: int = 65_536) -> str:
    """Decide the score type once for the whole column (a cheap pass over that column only).

    Per-chunk guessing could call the first chunk "labels" (all 0/1) and a later one
    "probabilities"; one decision for the column avoids mixing rules within a file.
    """
    path = Path(path)
    all_binary, lo, hi = True, np.inf, -np.inf
    for frame in iter_frames(path, [score_col], chunk_size):
        values = numeric_values(frame[score_col], column=score_col, source=str(path))
        if values.size:
            all_binary = all_binary and bool(np.all((values == 0) | (values == 1)))
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if not np.isfinite(lo):
        return "probability"  # no rows: nothing to decide
    return "label" if all_binary else "probability" if 0 <= lo and hi <= 1 else "logit"


def audit_scores_file(
    path: str | os.PathLike[str],
    score_col: str,
    options: AuditOptions,
    *,
    score_type: ScoreType | None = None,
) -> dict[str, Any]:
    """Audit a file that already holds scores or predictions (any model, any framework)."""
    path = Path(path)
    _validate(options)
    if score_type is not None and score_type not in SCORE_TYPES:
        raise UserError(f"--score-type must be one of {', '.join(SCORE_TYPES)}, got {score_type!r}")
    if score_col in options.protected or score_col in (options.label, options.weight):
        raise UserError(f"--score-col {score_col!r} is also used as the label, weight or a protected column")
    chunks = iter_labelled(
        path, label=options.label, positive=options.positive, protected=options.protected, weight=options.weight,
        missing_groups=options.missing_groups, normalize_labels=options.normalize_labels, features=False,
        extra=[score_col], chunksize=options.chunk_size,
    )
    # check the columns (first chunk) before the type scan reads the whole score column
    first = next(chunks, None)
    acc = _accumulator(options, score_type or scan_score_type(path, score_col, options.chunk_size))

    rest = itertools.chain([first] if first is not None else [], chunks)
    scored = ((data, _score_column(data, score_col, path)) for data in rest)
    return _consume(acc, scored, path, options.progress)


def _score_column(data: Any, score_col: str, path: Path) -> np.ndarray:
    """The score column of a parsed chunk as float64 (errors name the source rows)."""
    return numeric_values(pd.Series(data.extra[score_col], index=data.rows), column=score_col, source=str(path))


def audit_model_file(
    loaded: Any,
    path: str | os.PathLike[str],
    options: AuditOptions,
    *,
    schema: FeatureSchema | None = None,
    positive_index: int | None = None,
    batch_size: int = 8192,
    device: str = "cpu",
) -> dict[str, Any]:
    """Audit ``loaded`` (a :class:`gmn_debias.checkpoint.LoadedModel`) on a labelled file.

    Scores are positive-class probabilities (see :mod:`gmn_debias.predict`), computed chunk
    by chunk exactly as ``fit`` computes them, so an audit of fit's output reproduces its
    report.
    """
    from .checkpoint import model_input_width
    from .predict import predict_scores

    path = Path(path)
    acc = _accumulator(options, "probability")
    chunks = iter_labelled(
        path, schema=schema or loaded.schema, input_width=model_input_width(loaded.model), label=options.label,
        positive=options.positive, protected=options.protected, weight=options.weight,
        missing_groups=options.missing_groups, normalize_labels=options.normalize_labels, strict=options.strict,
        chunksize=options.chunk_size,
    )
    scored = ((d, predict_scores(loaded.model, d.x, positive_index=positive_index, batch_size=batch_size, device=device))
              for d in chunks)
    return _consume(acc, scored, path, options.progress)
