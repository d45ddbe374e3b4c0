"""Read a labelled CSV (or Parquet) into model inputs, 0/1 labels, group labels and weights.

Every cell is read as text (``dtype=str``, no NA conversion): a group called ``NA`` or
``1`` stays that label, and only an empty cell counts as missing. Labels are checked for
being binary across the whole file, also when it is streamed in chunks, so that Adult's
test split (``>50K.`` beside ``>50K``) is caught instead of silently mislabelled.
Rows in messages are counted from 1, after the header.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .checkpoint import model_input_width
from .errors import UserError
from .schema import FeatureSchema, first_rows, numeric_values, warn_unseen

log = logging.getLogger(__name__)

MissingGroups = Literal["error", "drop", "group"]
MISSING_GROUP = "<missing>"
GROUP_SEPARATOR = "|"
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class LabelledData:
    """One file (or one chunk of it), parsed.

    ``x`` (float32) is None when features were not requested (e.g. an audit of a scores
    column); ``y`` is int64 0/1; ``groups`` holds text labels; ``weights`` is float64;
    ``rows`` are the source row numbers kept (1 = first data row); ``extra`` holds the raw
    text of any extra columns asked for.
    """

    x: torch.Tensor | None
    y: torch.Tensor
    groups: np.ndarray
    weights: torch.Tensor | None
    n_rows: int
    rows: np.ndarray
    n_dropped: int = 0
    extra: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------ reading files
def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in _PARQUET_SUFFIXES


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install 'gmn-debias[parquet]' (or convert the file to CSV)") from None
    return pq


def read_header(path: str | os.PathLike[str]) -> list[str]:
    """Column names of a CSV/Parquet file, with a clear error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    if _is_parquet(path):
        return list(_pyarrow_parquet().ParquetFile(path).schema_arrow.names)
    try:
        return list(pd.read_csv(path, nrows=0, dtype=str).columns)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (no header line)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: cannot read it as CSV ({str(exc).splitlines()[0]})") from None


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet columns arrive typed; turn them into the text cells a CSV would give."""
    return frame.astype(object).where(frame.notna(), "").astype(str)


def iter_frames(path: str | os.PathLike[str], columns: Sequence[str], chunksize: int | None) -> Iterator[pd.DataFrame]:
    """Text-only frames of ``columns``, whole (``chunksize=None``) or in chunks; index = row numbers."""
    path = Path(path)
    require_columns(path, read_header(path), columns)
    start = 1
    if _is_parquet(path):
        pq = _pyarrow_parquet()
        if chunksize is None:
            batches: Any = [pq.read_table(path, columns=list(columns)).to_pandas()]
        else:
            batches = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=chunksize, columns=list(columns)))
    else:
        try:
            batches = pd.read_csv(
                path, usecols=list(columns), dtype=str, keep_default_na=False, na_filter=False, chunksize=chunksize
            )
            if chunksize is None:
                batches = [batches]
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            raise UserError(f"{path}: cannot read it as CSV ({str(exc).splitlines()[0]})") from None
    try:
        for frame in batches:
            frame = _as_text(frame) if _is_parquet(path) else frame
            frame.index = pd.RangeIndex(start, start + len(frame))
            start += len(frame)
            yield frame[list(columns)]
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as CSV near row {start} ({str(exc).splitlines()[0]})") from None


def require_columns(path: str | os.PathLike[str], header: Sequence[str], wanted: Sequence[str]) -> None:
    """Every wanted column must exist; suggest the closest name for a typo."""
    for col in wanted:
        if col not in header:
            same_case = [h for h in header if h.lower() == col.lower()]
            close = same_case or difflib.get_close_matches(col, list(header), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; it has: {', '.join(list(header)[:12])}{', …' if len(header) > 12 else ''}"
            raise UserError(f"{path}: no column {col!r}{hint}")


# ------------------------------------------------------------------------------ labels
def normalize_label(value: str) -> str:
    """Strip spaces and a trailing period: Adult's test split writes ``>50K.`` for ``>50K``."""
    return value.strip().rstrip(".").strip()


class LabelParser:
    """Maps a label column to 0/1, consistently across the chunks of one file.

    With ``positive`` given, that value is 1 and the (single) other value is 0. Without
    it, 0/1, -1/1 and True/False are understood (``1``/``1.0`` or ``True``/``true`` are
    one value); text needs ``positive``. More than two distinct values in the whole file
    is an error that lists them.
    """

    def __init__(self, column: str, positive: str | None = None, *, normalize: bool = False, source: str = "data") -> None:
        self.column = column
        self.normalize = normalize
        self.source = source
        self.positive = None if positive is None else self._clean(str(positive))
        self.seen: set[str] = set()

    def _clean(self, value: str) -> str:
        return normalize_label(value) if self.normalize else value.strip()

    def _key(self, value: str) -> str | float:
        """What makes two spellings the same value (exact text when ``positive`` names one)."""
        if self.positive is not None:
            return value
        if value.lower() in ("true", "false"):
            return value.lower()
        try:
            return float(value)
        except ValueError:
            return value

    def _where(self) -> str:
        return f"{self.source}: label column {self.column!r}"

    def _shown(self, limit: int = 10) -> str:
        values = sorted(self.seen)
        return ", ".join(map(repr, values[:limit])) + (f" (+{len(values) - limit} more)" if len(values) > limit else "")

    def __call__(self, cells: pd.Series) -> np.ndarray:
        values = cells.astype(str).map(self._clean)
        empty = (values == "").to_numpy()
        if empty.any():
            raise UserError(f"{self._where()} has empty cells at rows {first_rows(cells.index[empty])}")
        self.seen |= set(values.unique())
        keys = {self._key(v) for v in self.seen}
        if len(keys) > 2:
            hint = ""
            if not self.normalize and len({normalize_label(v) for v in self.seen}) <= 2:
                hint = "; they differ only by a trailing '.' or spaces: use --normalize-labels"
            raise UserError(f"{self._where()} has {len(keys)} distinct values ({self._shown()}), a binary label needs 2{hint}")
        if self.positive is not None:
            if len(keys) == 2 and self.positive not in keys:
                raise UserError(f"{self._where()}: positive class {self.positive!r} is not one of its values ({self._shown()})")
            return (values == self.positive).to_numpy().astype(np.int64)
        positive_keys = self._implicit_positive(keys)
        return values.map(lambda v: int(self._key(v) in positive_keys)).to_numpy().astype(np.int64)

    def _implicit_positive(self, keys: set[str | float]) -> set[str | float]:
        if keys <= {"true", "false"}:
            return {"true"}
        if any(isinstance(k, str) for k in keys):
            raise UserError(f"{self._where()} holds text values ({self._shown()}); name the positive class with --positive")
        if keys <= {0.0, 1.0} or keys <= {-1.0, 1.0}:
            return {1.0}
        raise UserError(f"{self._where()} has values {self._shown()}; without --positive a label must be 0/1, -1/1 or True/False")

    def finish(self) -> None:
        """After the last chunk: a positive class that never occurred is worth a warning."""
        if self.positive is not None and self.positive not in self.seen:
            log.warning("%s: the positive class %r never occurs; every row is negative", self._where(), self.positive)


# ------------------------------------------------------------------------------ groups
def group_labels(
    frame: pd.DataFrame, protected: Sequence[str], *, missing: MissingGroups = "error", source: str = "data"
) -> tuple[np.ndarray, np.ndarray]:
    """Group label per row (text; several columns joined by ``|``) and a keep-mask.

    An empty cell is an error naming the column and rows, unless ``missing`` is "drop"
    (mask the row out) or "group" (label the cell ``<missing>``). With no protected
    column every row is in one group, ``all``.
    """
    keep = np.ones(len(frame), dtype=bool)
    parts: list[pd.Series] = []
    for col in protected:
        cells = frame[col].astype(str).str.strip()
        empty = (cells == "").to_numpy()
        if empty.any():
            if missing == "error":
                raise UserError(
                    f"{source}: protected column {col!r} has {int(empty.sum())} empty cell(s) at rows "
                    f"{first_rows(frame.index[empty])}; fill them, or choose --missing-groups drop or group "
                    f"(a {MISSING_GROUP!r} group)"
                )
            if missing == "drop":
                keep &= ~empty
            else:
                cells = cells.where(~empty, MISSING_GROUP)
        parts.append(cells)
    if not parts:
        return np.full(len(frame), "all", dtype=object), keep
    joined = parts[0]
    for part in parts[1:]:
        joined = joined + GROUP_SEPARATOR + part
    return joined.to_numpy(dtype=object), keep


def parse_weights(cells: pd.Series, *, column: str, source: str = "data") -> np.ndarray:
    """Sample weights: numeric, finite and non-negative, or an error naming the rows."""
    values = numeric_values(cells, column=column, source=source)
    negative = values < 0
    if negative.any():
        raise UserError(f"{source}: weight column {column!r} has negative values at rows {first_rows(cells.index[negative])}")
    return values


# ---------------------------------------------------------------------------- features
def numeric_features(frame: pd.DataFrame, columns: Sequence[str], *, source: str = "data") -> torch.Tensor:
    """Without a schema, every feature column must already be a number."""
    if not columns:
        return torch.zeros((len(frame), 0))
    matrix = np.column_stack(
        [numeric_values(frame[c], column=c, source=f"{source} (no schema: features must be numeric)") for c in columns]
    )
    return torch.from_numpy(matrix.astype(np.float32))


def input_width_for(schema: FeatureSchema | None, width: int | None) -> int | None:
    """The model's input width, checked against the schema's encoding when both are known."""
    if schema is None:
        return width
    if width is not None and schema.width != width:
        raise UserError(f"the feature schema encodes {schema.width} inputs but the model takes {width}")
    return schema.width


@dataclass
class _Plan:
    """What to read and how, resolved once per file from the options and its header."""

    path: Path
    columns: list[str]
    label: str
    protected: list[str]
    weight: str | None
    features: list[str] | None  # None: x not wanted
    schema: FeatureSchema | None
    extra: list[str]


def _plan(
    path: str | os.PathLike[str],
    *,
    schema: FeatureSchema | None,
    input_width: int | None,
    label: str | None,
    protected: Sequence[str],
    weight: str | None,
    features: bool,
    extra: Sequence[str],
) -> _Plan:
    path = Path(path)
    header = read_header(path)
    if label is None:
        raise UserError(f"{path}: no label column given; pass --label COLUMN (or use a model whose schema names it)")
    require_columns(path, header, [label, *protected, *([weight] if weight else []), *extra])
    feature_cols: list[str] | None = None
    if features and schema is not None:
        input_width_for(schema, input_width)
        require_columns(path, header, schema.columns)
        feature_cols = schema.columns
    elif features:
        skip = {label, *protected, *([weight] if weight else []), *extra}
        feature_cols = [c for c in header if c not in skip]
        if input_width is not None and len(feature_cols) != input_width:
            raise UserError(
                f"{path}: {len(feature_cols)} feature columns but the model takes {input_width} inputs "
                f"(without a schema every column except label/protected/weight is a feature: "
                f"{', '.join(feature_cols[:8])}{' ...' if len(feature_cols) > 8 else ''}); pass --schema FILE"
            )
    wanted = [label, *protected, *([weight] if weight else []), *extra, *(feature_cols or [])]
    columns = list(dict.fromkeys(wanted))
    return _Plan(path, columns, label, list(protected), weight, feature_cols, schema, list(extra))


def _parse(
    frame: pd.DataFrame, plan: _Plan, labels: LabelParser, *, missing_groups: MissingGroups, strict: bool
) -> tuple[LabelledData, dict[str, tuple[int, str]]]:
    source = str(plan.path)
    groups, keep = group_labels(frame, plan.protected, missing=missing_groups, source=source)
    n_dropped = int((~keep).sum())
    if n_dropped:
        frame, groups = frame[keep], groups[keep]
    y = torch.from_numpy(labels(frame[plan.label]))
    weights = torch.from_numpy(parse_weights(frame[plan.weight], column=plan.weight, source=source)) if plan.weight else None
    unseen: dict[str, tuple[int, str]] = {}
    x: torch.Tensor | None = None
    if plan.features is not None and plan.schema is not None:
        x, unseen = plan.schema.encode(frame, strict=strict, source=source)
    elif plan.features is not None:
        x = numeric_features(frame, plan.features, source=source)
    extra = {c: frame[c].to_numpy(dtype=object) for c in plan.extra}
    data = LabelledData(x, y, groups, weights, len(frame), frame.index.to_numpy(), n_dropped, extra)
    return data, unseen


def _resolve_label(schema: FeatureSchema | None, label: str | None, positive: str | None) -> tuple[str | None, str | None]:
    """The schema's label/positive are defaults; its positive only applies to its own label."""
    if schema is None:
        return label, positive
    if label is None:
        label = schema.label
    if positive is None and label == schema.label:
        positive = schema.positive
    return label, positive


def iter_labelled(
    path: str | os.PathLike[str],
    *,
    schema: FeatureSchema | str | os.PathLike[str] | None = None,
    input_width: int | None = None,
    model: torch.nn.Module | None = None,
    label: str | None = None,
    positive: str | None = None,
    protected: Sequence[str] = (),
    weight: str | None = None,
    missing_groups: MissingGroups = "error",
    normalize_labels: bool = False,
    strict: bool = False,
    features: bool = True,
    extra: Sequence[str] = (),
    chunksize: int | None = 65_536,
) -> Iterator[LabelledData]:
    """Yield the file in parsed chunks (memory bounded by ``chunksize`` rows).

    ``schema`` is a :class:`FeatureSchema` or a YAML file; without one, every column except
    the label/protected/weight/extra columns must be numeric. The feature count is checked
    against ``input_width`` (or ``model_input_width(model)``). Label consistency and
    unseen-category counts span the whole file: the warning comes once, after the last
    chunk. ``chunksize=None`` yields the whole file at once.
    """
    if schema is not None and not isinstance(schema, FeatureSchema):
        schema = FeatureSchema.from_yaml(schema)
    if input_width is None and model is not None:
        input_width = model_input_width(model)
    label, positive = _resolve_label(schema, label, positive)
    plan = _plan(
        path, schema=schema, input_width=input_width, label=label, protected=protected,
        weight=weight, features=features, extra=extra,
    )
    labels = LabelParser(plan.label, positive, normalize=normalize_labels, source=str(plan.path))
    unseen_total: dict[str, tuple[int, str]] = {}
    kept = dropped = 0
    for frame in iter_frames(plan.path, plan.columns, chunksize):
        data, unseen = _parse(frame, plan, labels, missing_groups=missing_groups, strict=strict)
        for col, (count, example) in unseen.items():
            before, first_example = unseen_total.get(col, (0, example))
            unseen_total[col] = (before + count, first_example)
        kept += data.n_rows
        dropped += data.n_dropped
        yield data
    if kept == 0:
        raise UserError(f"{plan.path} has no usable data rows")
    labels.finish()
    warn_unseen(unseen_total, str(plan.path))
    if dropped:
        log.warning("%s: dropped %d row(s) with an empty protected cell", plan.path, dropped)


def load_labelled(
    path: str | os.PathLike[str],
    *,
    schema: FeatureSchema | str | os.PathLike[str] | None = None,
    input_width: int | None = None,
    model: torch.nn.Module | None = None,
    label: str | None = None,
    positive: str | None = None,
    protected: Sequence[str] = (),
    weight: str | None = None,
    missing_groups: MissingGroups = "error",
    normalize_labels: bool = False,
    strict: bool = False,
    features: bool = True,
    extra: Sequence[str] = (),
) -> LabelledData:
    """Read a whole labelled file at once (the options are :func:`iter_labelled`'s)."""
    (data,) = iter_labelled(
        path, schema=schema, input_width=input_width, model=model, label=label, positive=positive, protected=protected,
        weight=weight, missing_groups=missing_groups, normalize_labels=normalize_labels, strict=strict,
        features=features, extra=extra, chunksize=None,
    )
    return data


def concat(parts: Sequence[LabelledData]) -> LabelledData:
    """Join chunks back into one :class:`LabelledData` (tests and small files)."""
    xs = [p.x for p in parts]
    weights = [p.weights for p in parts]
    return LabelledData(
        x=None if any(x is None for x in xs) else torch.cat(xs),  # type: ignore[arg-type]
        y=torch.cat([p.y for p in parts]),
        groups=np.concatenate([p.groups for p in parts]),
        weights=None if any(w is None for w in weights) else torch.cat(weights),  # type: ignore[arg-type]
        n_rows=sum(p.n_rows for p in parts),
        rows=np.concatenate([p.rows for p in parts]),
        n_dropped=sum(p.n_dropped for p in parts),
        extra={k: np.concatenate([p.extra[k] for p in parts]) for k in (parts[0].extra if parts else {})},
    )
