"""The feature schema: how raw CSV columns become the model's input vector.

A model trained on tabular data is only usable with the exact encoding it was trained
with, so the encoding is fitted once and stored with the checkpoint (or in a YAML file):
numeric columns are standardized with the stored mean/std, categorical columns are
one-hot over a stored vocabulary, in a fixed column order. An unseen category becomes an
all-zero block (with a warning and a count) rather than a silent shift of the columns.
Rows in error messages are counted from 1, after the header.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from .errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def first_rows(index: Iterable[Any], limit: int = 5) -> str:
    """``"3, 7, 9 (+4 more)"``: the first offending rows, for one-line error messages."""
    rows = [str(i) for i in index]
    text = ", ".join(rows[:limit])
    return text + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")


def numeric_values(values: pd.Series, *, column: str, source: str) -> np.ndarray:
    """Parse text cells as float64; an empty or non-numeric cell is an error naming its rows."""
    stripped = values.astype(str).str.strip()
    parsed = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    bad = ~np.isfinite(parsed)
    if bad.any():
        rows = values.index[bad]
        example = stripped[bad].iloc[0]
        raise UserError(
            f"{source}: column {column!r} must be numeric, but has {int(bad.sum())} non-numeric or empty "
            f"cell(s) (e.g. {example!r}) at rows {first_rows(rows)}"
        )
    return parsed


@dataclass
class NumericFeature:
    """A numeric column, standardized as ``(x - mean) / std``."""

    name: str
    mean: float
    std: float

    @property
    def width(self) -> int:
        return 1


@dataclass
class CategoricalFeature:
    """A categorical column, one-hot over ``categories`` (in this order)."""

    name: str
    categories: list[str]

    @property
    def width(self) -> int:
        return len(self.categories)


Feature = NumericFeature | CategoricalFeature


@dataclass
class FeatureSchema:
    """Columns → model input, plus the default label column and positive class."""

    features: list[Feature]
    label: str | None = None
    positive: str | None = None

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        *,
        numeric: Sequence[str] = (),
        categorical: Sequence[str] = (),
        label: str | None = None,
        positive: str | None = None,
        source: str = "data",
    ) -> FeatureSchema:
        """Learn means/stds and vocabularies from ``frame`` (text cells, as data.py reads them).

        Columns keep the order given: all ``numeric`` first, then ``categorical``.
        Vocabularies are sorted so the encoding does not depend on row order.
        """
        missing = [c for c in [*numeric, *categorical] if c not in frame.columns]
        if missing:
            raise UserError(f"{source}: cannot fit a schema, missing column(s) {', '.join(map(repr, missing))}")
        features: list[Feature] = []
        for col in numeric:
            values = numeric_values(frame[col], column=col, source=source)
            std = float(values.std())
            features.append(NumericFeature(col, float(values.mean()), std if std > 0 else 1.0))
        for col in categorical:
            vocab = sorted(set(frame[col].astype(str).str.strip()))
            features.append(CategoricalFeature(col, vocab))
        return cls(features, label=label, positive=positive)

    # ---------------------------------------------------------------- properties
    @property
    def columns(self) -> list[str]:
        """The raw columns the encoding reads, in order."""
        return [f.name for f in self.features]

    @property
    def width(self) -> int:
        """Length of the encoded vector (the model's input width)."""
        return sum(f.width for f in self.features)

    @property
    def feature_names(self) -> list[str]:
        """One name per encoded column: ``age``, ``workclass=Private``, ..."""
        names: list[str] = []
        for f in self.features:
            if isinstance(f, NumericFeature):
                names.append(f.name)
            else:
                names.extend(f"{f.name}={c}" for c in f.categories)
        return names

    # ------------------------------------------------------------------ encoding
    def encode(self, frame: pd.DataFrame, *, strict: bool = False, source: str = "data") -> tuple[torch.Tensor, dict[str, tuple[int, str]]]:
        """Encode ``frame``; return the float32 tensor and unseen categories per column.

        The second value maps a column to (rows with an unseen category, one example),
        so a chunked reader can add counts up and warn once. ``strict`` turns any unseen
        category into a :class:`UserError`.
        """
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise UserError(f"{source}: missing column(s) the schema needs: {', '.join(map(repr, missing))}")
        n = len(frame)
        out = np.zeros((n, self.width), dtype=np.float32)
        unseen: dict[str, tuple[int, str]] = {}
        offset = 0
        for f in self.features:
            if isinstance(f, NumericFeature):
                values = numeric_values(frame[f.name], column=f.name, source=source)
                out[:, offset] = (values - f.mean) / f.std
            else:
                cells = frame[f.name].astype(str).str.strip()
                codes = pd.Index(f.categories).get_indexer(cells)
                known = codes >= 0
                out[np.flatnonzero(known), offset + codes[known]] = 1.0
                if not known.all():
                    example = str(cells[~known].iloc[0])
                    if strict:
                        raise UserError(
                            f"{source}: column {f.name!r} has {int((~known).sum())} row(s) with categories not in the "
                            f"schema (e.g. {example!r}) at rows {first_rows(frame.index[~known])}; "
                            "drop --strict to encode them as all-zero"
                        )
                    unseen[f.name] = (int((~known).sum()), example)
            offset += f.width
        return torch.from_numpy(out), unseen

    def transform(self, frame: pd.DataFrame, *, strict: bool = False, source: str = "data") -> torch.Tensor:
        """Encode ``frame`` to a float32 tensor of shape (rows, width), warning about unseen categories."""
        x, unseen = self.encode(frame, strict=strict, source=source)
        warn_unseen(unseen, source)
        return x

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-able mapping (what the checkpoint metadata and ``--schema`` files hold)."""
        feats: list[dict[str, Any]] = []
        for f in self.features:
            if isinstance(f, NumericFeature):
                feats.append({"name": f.name, "type": "numeric", "mean": f.mean, "std": f.std})
            else:
                feats.append({"name": f.name, "type": "categorical", "categories": list(f.categories)})
        return {"version": SCHEMA_VERSION, "label": self.label, "positive": self.positive, "features": feats}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "schema") -> FeatureSchema:
        """Rebuild a schema, checking every field so a hand-edited file fails clearly."""
        if not isinstance(data, Mapping) or not isinstance(data.get("features"), list):
            raise UserError(f"{source}: a schema must be a mapping with a 'features' list")
        if data.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise UserError(f"{source}: schema version {data['version']!r} is not supported (this gmn-debias reads {SCHEMA_VERSION})")
        features: list[Feature] = []
        for i, item in enumerate(data["features"]):
            where = f"{source}: features[{i}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise UserError(f"{where} must be a mapping with a 'name'")
            kind = item.get("type")
            try:
                if kind == "numeric":
                    std = float(item["std"])
                    if not np.isfinite(std) or std <= 0:
                        raise ValueError("std must be positive")
                    features.append(NumericFeature(item["name"], float(item["mean"]), std))
                elif kind == "categorical":
                    cats = item["categories"]
                    if not isinstance(cats, list) or len(set(map(str, cats))) != len(cats):
                        raise ValueError("categories must be a list of distinct values")
                    features.append(CategoricalFeature(item["name"], [str(c) for c in cats]))
                else:
                    raise ValueError(f"type must be 'numeric' or 'categorical', not {kind!r}")
            except (KeyError, TypeError, ValueError) as exc:
                detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
                raise UserError(f"{where} ({item['name']!r}): {detail}") from None
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"{source}: column(s) listed twice: {', '.join(dupes)}")
        label, positive = data.get("label"), data.get("positive")
        return cls(
            features,
            label=None if label is None else str(label),
            positive=None if positive is None else str(positive),
        )

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write the schema as YAML, atomically."""
        from .files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> FeatureSchema:
        """Read a schema written by :meth:`to_yaml` (or by hand)."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as exc:
            raise UserError(f"cannot read schema {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"schema {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, source=str(path))


def warn_unseen(unseen: Mapping[str, tuple[int, str]], source: str) -> None:
    """One warning per column with unseen categories (count and an example)."""
    for col, (count, example) in unseen.items():
        log.warning(
            "%s: column %r has %d row(s) with categories not in the schema (e.g. %r); encoded as all-zero "
            "(use --strict to refuse)",
            source,
            col,
            count,
            example,
        )
